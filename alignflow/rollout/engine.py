"""Rollout engines: prompts -> completions with token ids and the per-token log-probs of the distribution
actually sampled from. One interface and a registry (ENGINES): `transformers` (in-process, default), `static`
(alignflow/rollout/static_engine.py) and `vllm` (own process, alignflow/rollout/vllm_engine.py).

After every policy update the loop calls `sync(model)`, which loads the weights and then *verifies* them:
the engine's log-probs of a fixed probe sequence must match the trainer's, else `WeightSyncError`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


from alignflow.rollout.sync import SyncRecord, WeightSyncError  # noqa: F401  (WeightSyncError: re-exported)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 32
    temperature: float = 1.0
    greedy: bool = False


@dataclass
class Completions:
    """n completions per prompt, prompt-major. B = len(prompts) * n."""
    input_ids: torch.Tensor         # [B, P + T] left-padded prompt ids then completion ids (pad after EOS)
    attention_mask: torch.Tensor    # [B, P + T]
    completion_mask: torch.Tensor   # [B, T] 1 on generated tokens up to and including EOS
    logprobs: torch.Tensor          # [B, T] log-prob of each sampled token under the sampled distribution
    texts: list[str]                # decoded completions, special tokens removed
    prompt_index: torch.Tensor      # [B] which prompt each completion answers

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, -self.completion_mask.shape[1]:]


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int,
                   temperature: float = 1.0, return_entropy: bool = False):
    """Log-prob of each of the last `completion_len` tokens given everything before it. -> [B, T]
    Only the completion positions' logits are materialised (never the full [B, L, vocab] in fp32).
    A sharded trainer (FSDP) is passed as the module at its root, whose forward is this computation (rl._Scorer):
    only a call through it runs FSDP's hooks that gather its weights."""
    from torch.distributed.fsdp import FSDPModule
    if isinstance(model, FSDPModule):
        return model(input_ids, attention_mask, completion_len, temperature, return_entropy)
    from alignflow.lora import backbone
    model = backbone(model)  # under peft, the adapters sit inside the backbone's layers
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    logits = model.lm_head(hidden[:, -completion_len - 1:-1]).float() / temperature   # [B, T, V]
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, input_ids[:, -completion_len:, None]).squeeze(-1)
    if return_entropy:
        return logp, -(logp_all.exp() * logp_all).sum(-1)
    return logp


class TransformersEngine:
    """transformers `generate` on the trainer's own model object (so a sync is a no-op, but still verified), or on
    a copy of its weights that every sync refreshes (FSDP: this rank's full copy of the sharded trainer)."""

    name = "transformers"
    shares_trainer_weights = True  # samples from the trainer's own model object: its log-probs are the trainer's

    def __init__(self, model, tokenizer, probe_text: str = "<|user|>12+34=?<|assistant|>2+4=6;1+3=4;A:46<|end|>",
                 tolerance: float = 1e-4):
        self.model, self.tokenizer, self.tolerance = model, tokenizer, tolerance
        self.probe = tokenizer(probe_text, return_tensors="pt")["input_ids"].to(model.device)
        self._synced = SyncRecord(self.name, model, tolerance)   # the trainer as of the last sync

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, sampling: Sampling) -> Completions:
        """`prompts`: rendered chat text (models.chat_prompt), tokenised without added special tokens. A completion
        ends at the first of ANY eos id (models.eos_ids: the tokenizer's and generation_config's)."""
        from alignflow.models import after_stop, encode_prompts, eos_ids
        tok, model = self.tokenizer, self.model
        stops = eos_ids(model, tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
        enc = encode_prompts(tok, prompts, model.device)
        ids = enc["input_ids"].repeat_interleave(n, 0)
        mask = enc["attention_mask"].repeat_interleave(n, 0)
        was_training = model.training
        model.eval()
        kwargs = dict(do_sample=False) if sampling.greedy else dict(do_sample=True, temperature=sampling.temperature,
                                                                     top_k=0, top_p=1.0)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=pad,
                             eos_token_id=stops, **kwargs)
        model.train(was_training)
        completion = out.sequences[:, ids.shape[1]:]                               # [B, T]
        scores = torch.stack(out.scores, 1).float()                                 # [B, T, V] processed logits
        logprobs = F.log_softmax(scores, -1).gather(-1, completion[..., None]).squeeze(-1)
        # generated tokens: everything up to and including the first eos (any of them)
        after_eos = after_stop(completion, stops)
        completion_mask = (~after_eos).long()
        completion = completion.masked_fill(after_eos, pad)
        texts = tok.batch_decode(completion, skip_special_tokens=True)
        return Completions(input_ids=torch.cat([ids, completion], 1),
                           attention_mask=torch.cat([mask, completion_mask], 1),
                           completion_mask=completion_mask, logprobs=logprobs.masked_fill(after_eos, 0.0),
                           texts=texts, prompt_index=torch.arange(len(prompts)).repeat_interleave(n))

    @torch.no_grad()
    def probe_logprobs(self) -> torch.Tensor:
        """The probe scored through the sampling path: the model's own forward (what `generate` calls), not the
        trainer's `token_logprobs`, at temperature 1. -> [1, L - 1]"""
        logits = self.model(input_ids=self.probe, attention_mask=torch.ones_like(self.probe)).logits[:, :-1].float()
        return F.log_softmax(logits, -1).gather(-1, self.probe[:, 1:, None]).squeeze(-1)

    def sync(self, trainer_model) -> float:
        """Nothing to load when the engine samples from the trainer's own object, else its weights copied in
        (gathered from a sharded trainer); then verified: the engine's probe log-probs match the trainer's and moved
        with them since the last sync (alignflow.rollout.sync). Returns max |diff|."""
        from alignflow.rollout.sync import load_weights
        if trainer_model is not self.model:
            load_weights(self.model, trainer_model)
        with torch.no_grad():
            mask = torch.ones_like(self.probe)
            expected = token_logprobs(trainer_model, self.probe, mask, self.probe.shape[1] - 1)
        diff = self._synced.verify(self.probe_logprobs(), expected)
        self._synced.record(trainer_model, expected)
        return diff

    def check_synced(self) -> None:
        """Before sampling: WeightSyncError if the trainer's weights changed since the last sync."""
        self._synced.check_unchanged()


# name -> "module:class": imported when asked for (vLLM's client needs its own environment, the static engine CUDA)
ENGINES = {"transformers": "alignflow.rollout.engine:TransformersEngine",
           "static": "alignflow.rollout.static_engine:StaticCacheEngine",
           "vllm": "alignflow.rollout.vllm_engine:VLLMEngine"}


def make_engine(name: str, model, tokenizer, dtype: torch.dtype | None = None, tolerance: float | None = None):
    """transformers (in-process generate), static (own decode loop: static KV cache, torch.compile and CUDA
    graphs on GPU; `dtype`: its own copy of the weights in that dtype), vllm (its own environment and process).
    `tolerance`: the sync check's absolute tolerance (None: the engine's default)."""
    import importlib
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; engines: {sorted(ENGINES)}")
    module, _, cls = ENGINES[name].partition(":")
    engine = getattr(importlib.import_module(module), cls)
    options = {k: v for k, v in (("dtype", dtype), ("tolerance", tolerance)) if v is not None}
    return engine(model, tokenizer, **options)
