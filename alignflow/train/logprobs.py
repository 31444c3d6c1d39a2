"""The RL update's per-token log-probs, in chunks of tokens (issue 18).

`policy_logprobs` is `alignflow.rollout.token_logprobs`'s contract (log-prob of each of the last `completion_len`
tokens given everything before it, [B, T], fp32) computed from the final hidden states: the lm_head is applied to
`chunk` tokens at a time, each chunk's log-softmax and gather taken in fp32 from logits in the compute dtype (bf16
under the pipeline's bf16 autocast, as verl and Liger do), and the backward recomputes each chunk's logits
(`alignflow.train.fast.chunked_token_logprobs`, a custom autograd function). So no [tokens x vocab] tensor, fp32 or
otherwise, exists at any time: at most [chunk x vocab]. At a 151,936-token vocabulary and 64 x 256 completion
tokens the unchunked version held 16,384 x 151,936 fp32 logits (9.3 GiB) plus their log-softmax and gradient.

Falls back to the unchunked `token_logprobs` when the lm_head is not a plain bias-free linear layer (e.g. peft
adapters on the lm_head itself), where its weight alone is not the map from hidden states to logits.
"""
from __future__ import annotations

import torch

from alignflow.train import fast

CHUNK = 4096   # tokens per lm_head chunk: 4,096 x 151,936 fp32 = 2.3 GiB of logits at most


def _plain_head(model) -> bool:
    head = getattr(model, "lm_head", None)
    return type(head) is torch.nn.Linear and head.bias is None


@torch.no_grad()
def _chunked_entropy(hidden: torch.Tensor, weight: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
    """H(softmax(hidden @ weight.T / T)) per row of hidden [N, d], chunk by chunk, in fp32. -> [N]"""
    dtype = fast._compute_dtype(hidden, weight)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        h, w = hidden.to(dtype), weight.to(dtype)
        out = torch.empty(h.shape[0], dtype=torch.promote_types(dtype, torch.float32), device=h.device)
        for s in range(0, h.shape[0], chunk):
            logp = torch.log_softmax(fast._acc(h[s:s + chunk] @ w.t()) / temperature, -1)
            out[s:s + chunk] = -(logp.exp() * logp).sum(-1)
    return out


def policy_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int,
                    temperature: float = 1.0, return_entropy: bool = False, chunk: int = CHUNK):
    """Log-prob of each of the last `completion_len` tokens given everything before it, the lm_head applied
    `chunk` tokens at a time (forward and backward). -> [B, T] fp32, as token_logprobs (and the entropies [B, T],
    without gradient, when `return_entropy`)"""
    from alignflow.rollout import token_logprobs
    from alignflow.lora import backbone
    lm = backbone(model)  # under peft, the adapters sit inside the backbone's layers
    if not _plain_head(lm):
        return token_logprobs(model, input_ids, attention_mask, completion_len, temperature, return_entropy)
    T = completion_len
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = lm.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    hidden = hidden[:, -T - 1:-1]                                               # [B, T, d]: predicts the next token
    targets = input_ids[:, -T:]
    weight = lm.lm_head.weight
    logp = fast.chunked_token_logprobs(hidden, weight, targets, temperature=temperature, chunk=chunk).float()
    if not return_entropy:
        return logp
    entropy = _chunked_entropy(hidden.detach().reshape(-1, hidden.shape[-1]), weight.detach(), temperature, chunk)
    return logp, entropy.view(targets.shape).float()
