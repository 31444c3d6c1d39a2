"""Issue 18 on CPU: the RL update's per-token log-probs in chunks of tokens (alignflow.train.logprobs) equal a plain
per-sequence loop, gradients too, and never create a [tokens x vocab] tensor; the SFT stage's packed trainer
(alignflow.train.fast.train_sft_packed) takes the same steps as a plain padded-batch computation."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from alignflow import models
from alignflow.config import TinyModelConfig
from alignflow.rollout import token_logprobs
from alignflow.train import fast
from alignflow.train.logprobs import policy_logprobs

SHAPE = TinyModelConfig(hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=32)
T = 6  # completion tokens per row


@pytest.fixture(scope="module")
def tok():
    return models.build_tokenizer()


def _model(tok, dtype, seed=0):
    torch.manual_seed(seed)
    m = models.build_tiny_model(tok, SHAPE).to(dtype).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0)   # sharper distributions than the init's near-uniform ones
    return m


def _batch(tok, seed=1):
    """4 rows: prompts of different lengths, left-padded, each followed by T completion tokens (no padding)."""
    g = torch.Generator().manual_seed(seed)
    V, pad = len(tok), tok.pad_token_id
    lengths = [3, 7, 5, 9]
    L = max(lengths) + T
    ids = torch.full((len(lengths), L), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, L - n - T:] = torch.randint(0, V, (n + T,), generator=g)
        mask[b, L - n - T:] = 1
    return ids, mask


def _loop_reference(model, ids, mask, temperature):
    """Each row unpadded through the model on its own; the log-prob of each completion token, one at a time."""
    out = []
    for b in range(ids.shape[0]):
        seq = ids[b][mask[b].bool()]
        logits = model(input_ids=seq[None]).logits[0]
        row = []
        for t in range(T):
            at = len(seq) - T + t
            row.append(torch.log_softmax(logits[at - 1] / temperature, -1)[seq[at]])
        out.append(torch.stack(row))
    return torch.stack(out)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_and_gradients_equal_a_plain_loop(tok, temperature):
    model = _model(tok, torch.float64)
    ids, mask = _batch(tok)
    N = ids.shape[0] * T
    got = policy_logprobs(model, ids, mask, T, temperature, chunk=5)          # 24 tokens: 5 chunks, the last 4
    assert 5 < N and got.shape == (ids.shape[0], T)
    weights = torch.randn(ids.shape[0], T, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((got * weights).sum(), list(model.parameters()))
    ref = _loop_reference(model, ids, mask, temperature)
    ref_grads = torch.autograd.grad((ref * weights).sum(), list(model.parameters()))
    assert got.dtype == torch.float32   # token_logprobs' contract (computed here in fp64, returned in fp32)
    torch.testing.assert_close(got, ref.float(), atol=1e-6, rtol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    # and the unchunked path the engines' sync checks use
    torch.testing.assert_close(got, token_logprobs(model, ids, mask, T, temperature), atol=1e-6, rtol=1e-6)


def test_entropy_in_chunks_equals_unchunked(tok):
    model = _model(tok, torch.float64)
    ids, mask = _batch(tok)
    with torch.no_grad():
        lp, ent = policy_logprobs(model, ids, mask, T, 0.9, return_entropy=True, chunk=7)
        ref_lp, ref_ent = token_logprobs(model, ids, mask, T, 0.9, return_entropy=True)
    torch.testing.assert_close(lp, ref_lp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, ref_ent, atol=1e-6, rtol=1e-6)


class _Shapes(TorchDispatchMode):
    """Every tensor an aten op returns (forward and backward), as (shape, dtype)."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen += [(tuple(t.shape), t.dtype) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out


def _largest_vocab_tensor(seen, V) -> int:
    """Rows of the largest fp32 tensor whose last dimension is the vocabulary (logits, log-softmax, their grads),
    the lm_head weight's transpose [hidden, V] aside."""
    return max((math.prod(s[:-1]) for s, d in seen
                if s and s[-1] == V and d == torch.float32 and s != (SHAPE.hidden_size, V)), default=0)


def test_no_tokens_by_vocab_fp32_tensor_forward_or_backward(tok):
    model = _model(tok, torch.float32).train()
    ids, mask = _batch(tok)
    V, N, chunk = len(tok), ids.shape[0] * T, 5
    assert chunk < SHAPE.hidden_size < N   # a chunk's logits [5, V], the weight's transpose [16, V], all [24, V]
    with _Shapes() as chunked:
        (policy_logprobs(model, ids, mask, T, 1.0, chunk=chunk) * 0.5).sum().backward()
    model.zero_grad()
    with _Shapes() as unchunked:
        (token_logprobs(model, ids, mask, T, 1.0) * 0.5).sum().backward()
    assert _largest_vocab_tensor(unchunked.seen, V) >= N          # the old path: [B, T, V] fp32 logits
    assert 0 < _largest_vocab_tensor(chunked.seen, V) <= chunk   # the new one: one chunk of tokens at a time


def test_the_rl_update_scores_through_the_chunked_path():
    from alignflow.train import rl
    assert rl.token_logprobs is policy_logprobs


# ------------------------------------------------------------------------------------- train_sft_packed (CPU)
def _examples(V, n=10, seed=3):
    """Random documents of 5..30 tokens, the first third a prompt (labels IGNORE), transformers' convention."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(5, 31, (1,), generator=g))
        ids = torch.randint(0, V, (L,), generator=g).tolist()
        k = L // 3
        out.append((ids, [fast.IGNORE] * k + ids[k:]))
    return out


def _padded_loss(model, examples, idx, pad):
    """Mean next-token CE over every labelled token of the step's examples, one right-padded batch."""
    chosen = [examples[i] for i in idx]
    L = max(len(x) for x, _ in chosen)
    ids = torch.full((len(chosen), L), pad, dtype=torch.long)
    labels = torch.full((len(chosen), L), fast.IGNORE, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (x, y) in enumerate(chosen):
        ids[b, :len(x)], labels[b, :len(y)], mask[b, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=fast.IGNORE)


def test_train_sft_packed_takes_the_steps_of_a_plain_padded_batch(tok, tmp_path):
    from alignflow.train.supervised import cosine_with_warmup
    model = _model(tok, torch.float64).train()   # fp64: Adam's g / sqrt(v) amplifies fp32 rounding of tiny grads
    ref = copy.deepcopy(model)
    examples = _examples(len(tok))
    steps, batch, lr, seed = 3, 4, 3e-3, 11
    logs = []
    fast.train_sft_packed(model, examples, batch, tok.pad_token_id, torch.Generator().manual_seed(seed), steps=steps,
                          lr=lr, ckpt_dir=tmp_path, checkpoint_every=10 ** 9, on_log=lambda s, m: logs.append(m),
                          seq_len=32, rows_per_micro=2, compile=False)
    # the same draws, loss, AdamW (weight decay 0.01), clipping at 1 and schedule, written out plainly
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=0.01)
    sched = cosine_with_warmup(opt, steps, warmup=max(1, steps // 20))
    for step in range(steps):
        idx = torch.randint(0, len(examples), (batch,), generator=g).tolist()
        loss = _padded_loss(ref, examples, idx, tok.pad_token_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        assert logs[step]["loss"] == pytest.approx(loss.item(), rel=1e-6), step   # logged from an fp32 sum
    assert logs[-1]["micro_batches"] >= 1 and len(logs) == steps
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=name)
