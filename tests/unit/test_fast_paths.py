"""Issue 7's fast paths, checked on CPU in fp32 against transformers' own code:
StaticCacheEngine (greedy == `model.generate`, log-probs == teacher-forced forward, verified sync) and
alignflow.train.fast (packed loss == per-sequence loss, chunked CE / log-probs == full, gradients too)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from alignflow import decoder, models
from alignflow.config import TinyModelConfig
from alignflow.rollout import Sampling, TransformersEngine, token_logprobs
from alignflow.rollout.engine import WeightSyncError
from alignflow.rollout.static_engine import StaticCacheEngine
from alignflow.train import fast

SHAPE = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
PROMPTS = ["<|user|>12+34=?<|assistant|>", "<|user|>7-5=?<|assistant|>", "<|user|>100+1=?<|assistant|>A"]


@pytest.fixture(scope="module")
def tok():
    return models.build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = models.build_tiny_model(tok, SHAPE).eval()
    with torch.no_grad():  # a sharper random model (argmax margins well above fp32 noise) that ends some answers
        m.lm_head.weight.mul_(40.0)
        enc = tok(PROMPTS[:2], return_tensors="pt", padding=True, padding_side="left")
        h = m.model(**enc).last_hidden_state.reshape(-1, SHAPE.hidden_size)
        top = m.lm_head(h).max(-1).values.mean()
        m.lm_head.weight[tok.eos_token_id] = h.mean(0) / h.mean(0).norm() ** 2 * top
    return m


def _hf_greedy(model, tok, prompts, max_new):
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    return out[:, enc["input_ids"].shape[1]:]


def test_greedy_matches_transformers_generate(model, tok):
    engine = StaticCacheEngine(model, tok)
    assert not engine.compile and not engine.cuda_graphs  # CPU: eager path
    got = engine.generate(PROMPTS, 1, Sampling(max_new_tokens=40, greedy=True))
    want = _hf_greedy(model, tok, PROMPTS, 40)
    assert got.completion_ids.shape == want.shape
    assert torch.equal(got.completion_ids, want)
    # the same answer as TransformersEngine, field by field
    ref = TransformersEngine(model, tok).generate(PROMPTS, 1, Sampling(max_new_tokens=40, greedy=True))
    assert torch.equal(got.input_ids, ref.input_ids)
    assert torch.equal(got.attention_mask, ref.attention_mask)
    assert torch.equal(got.completion_mask, ref.completion_mask)
    assert got.texts == ref.texts
    assert torch.equal(got.prompt_index, ref.prompt_index)
    torch.testing.assert_close(got.logprobs, ref.logprobs, atol=1e-4, rtol=0)


def test_eos_handling(model, tok):
    engine = StaticCacheEngine(model, tok)
    got = engine.generate(PROMPTS, 4, Sampling(max_new_tokens=48, temperature=1.0))
    ends = (got.completion_ids == tok.eos_token_id).any(-1)
    lengths = got.completion_mask.sum(-1)
    assert ends.any(), "fixture should make EOS reachable"
    # after EOS: pad ids, zero mask, zero log-prob
    for row in range(len(lengths)):
        n = int(lengths[row])
        assert (got.completion_ids[row, n:] == tok.pad_token_id).all()
        assert (got.logprobs[row, n:] == 0).all()
        if ends[row]:
            assert got.completion_ids[row, n - 1] == tok.eos_token_id


@pytest.mark.parametrize("greedy,temperature", [(True, 1.0), (False, 1.0), (False, 0.7)])
def test_logprobs_match_teacher_forced(model, tok, greedy, temperature):
    torch.manual_seed(1)
    engine = StaticCacheEngine(model, tok)
    c = engine.generate(PROMPTS, 3, Sampling(max_new_tokens=24, temperature=temperature, greedy=greedy))
    T = c.completion_mask.shape[1]
    with torch.no_grad():
        ref = token_logprobs(model, c.input_ids, c.attention_mask, T, temperature)
    mask = c.completion_mask.bool()
    assert mask.sum() > 0
    torch.testing.assert_close(c.logprobs[mask], ref[mask], atol=1e-4, rtol=0)
    assert (c.logprobs[~mask] == 0).all()


def test_sampling_follows_the_distribution(tok):
    """Exponential-race sampling at temperature T has the frequencies of softmax(logits / T)."""
    torch.manual_seed(0)
    m = models.build_tiny_model(tok, SHAPE).eval()
    engine = StaticCacheEngine(m, tok)
    x = torch.randn(1, SHAPE.hidden_size) * 3
    V = m.lm_head.weight.shape[0]
    with torch.no_grad():
        logits = F.linear(decoder.rms_norm(x, m.model.norm.weight, engine.spec.eps), m.lm_head.weight)[0] * 40
        m.lm_head.weight.mul_(40)
        probs = F.softmax(logits / 0.5, -1)
        toks, lps = engine._sample(x.expand(20000, -1).contiguous(), False, torch.tensor([0.5]))
    freq = torch.bincount(toks, minlength=V).float() / len(toks)
    assert (freq - probs).abs().max() < 0.02
    torch.testing.assert_close(lps, probs.log()[toks], atol=1e-4, rtol=0)


def test_fused_weights_match_and_follow_in_place_updates(model, tok):
    m = copy.deepcopy(model)
    fused, plain = StaticCacheEngine(m, tok), StaticCacheEngine(m, tok, fuse_weights=False)
    s = Sampling(max_new_tokens=24, greedy=True)
    a, b = fused.generate(PROMPTS, 1, s), plain.generate(PROMPTS, 1, s)
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    with torch.no_grad():  # an optimizer-style in-place update, no sync: the fused copies must follow
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    c = fused.generate(PROMPTS, 2, Sampling(max_new_tokens=16, temperature=0.9))
    with torch.no_grad():
        ref = token_logprobs(m, c.input_ids, c.attention_mask, c.completion_mask.shape[1], 0.9)
    mask = c.completion_mask.bool()
    torch.testing.assert_close(c.logprobs[mask], ref[mask], atol=1e-4, rtol=0)


def test_sync_copies_and_verifies(model, tok, monkeypatch):
    trainer = copy.deepcopy(model)
    engine = StaticCacheEngine(copy.deepcopy(model), tok)
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    assert engine.sync(trainer) < 1e-4
    assert torch.equal(engine.model.model.layers[0].mlp.up_proj.weight, trainer.model.layers[0].mlp.up_proj.weight)
    with torch.no_grad():
        trainer.model.layers[0].mlp.up_proj.weight.add_(0.5)
    from alignflow.rollout import sync as sync_module
    monkeypatch.setattr(sync_module, "load_weights", lambda engine_model, trainer_model: None)  # a sync that does not take
    with pytest.raises(WeightSyncError):
        engine.sync(trainer)


def test_own_dtype_copy_is_synced(model, tok):
    engine = StaticCacheEngine(model, tok, dtype=torch.float64, tolerance=1e-4)
    assert engine.model is not model and engine.dtype == torch.float64
    assert engine.sync(model) < 1e-4


# ------------------------------------------------------------------------------------------------ fast training

def _examples(tok, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(3, 20, (1,), generator=g))
        ids = torch.randint(4, len(tok), (L,), generator=g).tolist()
        k = int(torch.randint(0, L - 1, (1,), generator=g))
        out.append((ids, [fast.IGNORE] * k + ids[k:]))
    return out


def _reference_loss(model, examples):
    """Per-sequence transformers forward: sum of next-token CE over labelled positions / their count."""
    total, count = 0.0, 0
    for ids, labels in examples:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        y = torch.tensor(labels[1:])
        total = total + F.cross_entropy(logits, y, ignore_index=fast.IGNORE, reduction="sum")
        count += int((y != fast.IGNORE).sum())
    return total / count


def test_packing_layout(tok):
    ex = _examples(tok)
    [batch] = fast.pack_examples(ex, seq_len=32, pad_id=tok.pad_token_id)
    R, L = batch.input_ids.shape
    assert L == 32 and R < len(ex)
    assert int(batch.cu_seqlens[-1]) == R * L
    assert sorted(batch.doc_lengths) == sorted(min(len(x), 32) for x, _ in ex)
    # positions restart at every segment boundary, targets never cross one
    flat_pos, flat_doc, flat_t = batch.position_ids.view(-1), batch.doc_ids.view(-1), batch.targets.view(-1)
    for a, b in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist()):
        assert flat_pos[a:b].tolist() == list(range(b - a))
        assert len(set(flat_doc[a:b].tolist())) == 1
        assert flat_t[b - 1] == fast.IGNORE
    assert batch.n_targets == sum(sum(1 for y in lab[1:] if y != fast.IGNORE) for _, lab in ex)


@pytest.mark.parametrize("fuse", [True, False])
def test_packed_loss_equals_per_sequence_loss(model, tok, fuse):
    ex = _examples(tok)
    [batch] = fast.pack_examples(ex, seq_len=32, pad_id=tok.pad_token_id)
    m1, m2 = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    ff = fast.FastForward(m1, attention="sdpa", compile=False, fuse_projections=fuse)
    packed = ff.loss(batch, chunk=7)
    ref = _reference_loss(m2, ex)
    torch.testing.assert_close(packed, ref, atol=1e-5, rtol=1e-5)
    packed.backward()
    ref.backward()
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_gradient_checkpointing_same_gradients(model, tok):
    [batch] = fast.pack_examples(_examples(tok, seed=3), seq_len=32, pad_id=tok.pad_token_id)
    grads = []
    for ckpt in (False, True):
        m = copy.deepcopy(model).train()
        fast.FastForward(m, attention="sdpa", compile=False, gradient_checkpointing=ckpt).loss(batch).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk", [5, 64])
def test_chunked_cross_entropy_equals_full(chunk):
    torch.manual_seed(0)
    N, d, V = 37, 16, 50
    h = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (N,))
    y[::4] = fast.IGNORE
    got = fast.chunked_cross_entropy(h, w, y, chunk=chunk)
    gh, gw = torch.autograd.grad(got * 3.0, (h, w))
    ref = F.cross_entropy(h @ w.t(), y, ignore_index=fast.IGNORE)
    rh, rw = torch.autograd.grad(ref * 3.0, (h, w))
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)
    s = fast.chunked_cross_entropy(h, w, y, chunk=chunk, reduction="sum")
    torch.testing.assert_close(s, F.cross_entropy(h @ w.t(), y, ignore_index=fast.IGNORE, reduction="sum"))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_full(temperature):
    torch.manual_seed(0)
    N, d, V = 29, 16, 50
    h = torch.randn(2, N, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (2, N))
    got = fast.chunked_token_logprobs(h, w, y, temperature=temperature, chunk=6)
    ref = F.log_softmax((h @ w.t()) / temperature, -1).gather(-1, y[..., None]).squeeze(-1)
    torch.testing.assert_close(got, ref)
    g = torch.randn(2, N, dtype=torch.float64)
    gh, gw = torch.autograd.grad((got * g).sum(), (h, w))
    rh, rw = torch.autograd.grad((ref * g).sum(), (h, w))
    torch.testing.assert_close(gh, rh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-6, rtol=1e-5)


def test_trainer_step_reduces_loss(model, tok):
    m = copy.deepcopy(model).train()
    batches = fast.pack_examples(_examples(tok, n=12, seed=5), seq_len=32, pad_id=tok.pad_token_id, rows_per_batch=2)
    trainer = fast.FastSFTTrainer(m, lr=3e-3, weight_decay=0.0, attention="sdpa", compile=False)
    assert not any(g.get("fused") for g in trainer.optimizer.param_groups)  # CPU: not fused
    first = float(trainer.step(batches)["loss"])
    for _ in range(4):
        last = float(trainer.step(batches)["loss"])
    assert last < first


def test_flop_counts(model):
    spec = decoder.decoder_spec(model)
    n, emb = fast.model_flops_per_token(model)
    assert emb == model.model.embed_tokens.weight.numel()
    assert n == sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2) + model.lm_head.weight.numel()
    assert fast.attention_flops(spec, [4], backward=False) == 2 * 2 * spec.n_layers * spec.heads * spec.head_dim * 10
