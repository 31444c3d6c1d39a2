"""The weight-sync checks fail when the guarded thing breaks: trainer weights perturbed without a sync, an engine
not on the trainer's weights, a sync that did not take (even below the absolute tolerance), and (static engine) a
decode path that samples something other than what the eager probe scores."""
import copy

import pytest
import torch

from alignflow.rollout.engine import TransformersEngine, WeightSyncError
from alignflow.rollout import sync as sync_module
from alignflow.rollout.sync import SyncRecord


@pytest.fixture(scope="module")
def tok():
    from alignflow.models import build_tokenizer
    return build_tokenizer()


def tiny(tok, seed=0):
    from alignflow.config import TinyModelConfig
    from alignflow.models import build_tiny_model
    torch.manual_seed(seed)
    return build_tiny_model(tok, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                                 intermediate_size=64)).eval()


def perturb(model, scale=1e-2):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def static_engine(model, tok, **kw):
    from alignflow.rollout.static_engine import StaticCacheEngine
    return StaticCacheEngine(model, tok, **kw)


ENGINES = {"transformers": TransformersEngine, "static": static_engine}


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_sync_passes_then_trainer_changed_without_a_sync_fails(name, tok):
    model = tiny(tok)
    engine = ENGINES[name](model, tok)
    assert engine.sync(model) <= 1e-4
    engine.check_synced()                                    # nothing changed since
    perturb(model)                                           # an update nobody synced
    with pytest.raises(WeightSyncError, match="changed since the last sync"):
        engine.check_synced()
    engine.sync(model)                                       # the sync makes it current again
    engine.check_synced()


def test_perturbing_through_data_is_also_seen(tok):
    """`p.data` edits do not bump autograd's version counters; the fingerprint sees the values."""
    model = tiny(tok)
    engine = TransformersEngine(model, tok)
    next(model.parameters()).data[0, 0] += 1e-3
    with pytest.raises(WeightSyncError):
        engine.check_synced()


def test_transformers_engine_on_its_own_copy_loads_it_and_fails_when_the_load_does_not_take(tok, monkeypatch):
    """An engine sampling from another object (FSDP: each rank's full copy) gets the trainer's weights at every
    sync; with that load broken, the trainer moved and the copy did not: the check fires."""
    trainer = tiny(tok)
    engine = TransformersEngine(copy.deepcopy(trainer), tok)   # samples from another object
    assert engine.sync(trainer) <= 1e-4                        # equal weights: passes
    perturb(trainer)
    assert engine.sync(trainer) <= 1e-4                        # the sync copied the moved weights in
    engine.check_synced()
    monkeypatch.setattr(sync_module, "load_weights", lambda engine_model, trainer_model: None)
    perturb(trainer)
    with pytest.raises(WeightSyncError, match="did not take"):
        engine.sync(trainer)


def test_static_engine_sync_that_did_not_take_fails(tok, monkeypatch):
    """An engine with its own copy (float64 here) whose load is broken: the trainer moved, the engine did not."""
    trainer = tiny(tok)
    engine = static_engine(trainer, tok, dtype=torch.float64, tolerance=1.0)   # tolerance too loose to matter
    engine.sync(trainer)
    monkeypatch.setattr(sync_module, "load_weights", lambda engine_model, trainer_model: None)   # the load broken
    perturb(trainer, 1e-3)
    with pytest.raises(WeightSyncError, match="did not follow the trainer"):
        engine.sync(trainer)


def test_static_engine_checks_the_decode_path_that_samples(tok, monkeypatch):
    """A decode step that uses different weights from the eager prefill (as a stale CUDA graph or fused copy
    would) passes a probe scored eagerly but fails the sync, which decodes through the sampling path."""
    model = tiny(tok)
    engine = static_engine(model, tok)
    engine.sync(model)
    f_out = engine._f_out
    monkeypatch.setattr(engine, "_f_out", lambda x, o, w_out: f_out(x, o, w_out) * 1.5)
    assert (engine.probe_logprobs() - engine._synced.trainer_probe).abs().max() <= 1e-4   # eager: unchanged
    with pytest.raises(WeightSyncError, match="differ from the trainer"):
        engine.sync(model)


def test_a_stale_engine_below_the_absolute_tolerance_is_caught():
    record = SyncRecord("fake", torch.nn.Linear(1, 1), tolerance=1e-2)
    old = torch.tensor([[-1.0, -2.0]])
    record.verify(old + 1e-6, old)
    record.record(record.trainer, old)
    new = old + 3e-3                                          # the trainer moved 3e-3 (< tolerance)
    assert record.verify(new + 1e-6, new) < 1e-5              # an engine that followed passes
    record.record(record.trainer, new)
    newer = new + 3e-3
    with pytest.raises(WeightSyncError, match="did not follow"):
        record.verify(new, newer)                             # an engine still on the last weights fails


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_the_loop_refuses_to_sample_after_an_unsynced_change(name, tok, monkeypatch):
    """rl.train_candidate checks before every rollout: an update applied outside the loop's sync fails the step."""
    from alignflow.config import CandidateConfig, RLConfig
    from alignflow.train import rl
    make = rl.make_engine

    def sabotaged(*a, **k):
        engine = make(*a, **k)
        sync = engine.sync

        def sync_then_drift(model):
            diff = sync(model)
            perturb(model)                                    # the weights move after the verified sync
            return diff
        engine.sync = sync_then_drift
        return engine
    monkeypatch.setattr(rl, "make_engine", sabotaged)
    model = tiny(tok)
    with pytest.raises(WeightSyncError, match="changed since the last sync"):
        import tempfile
        from pathlib import Path
        with tempfile.TemporaryDirectory() as tmp:
            rl.train_candidate(model, tok, CandidateConfig(name="t", steps=2, checkpoints=[2], seeds=[0]), 0,
                               RLConfig(prompts_per_step=2, group_size=2, max_new_tokens=4, engine=name),
                               ["1+2=?", "3+4=?"], ["3", "7"], Path(tmp), on_log=lambda s, m: None,
                               reward_fn=lambda prompts, completions, **kw: [float(len(c) % 2) for c in completions])


def test_bf16_static_engine_copy_syncs_and_its_check_still_fails(tok, monkeypatch):
    """The RL loop's engine under precision bf16 (rl._engine on CUDA): its own bf16 copy of an fp32 trainer. A sync
    copies the weights in and passes at the bf16 tolerance; a sync that did not take fails once the trainer moved."""
    from alignflow.rollout.engine import make_engine
    from alignflow.train.rl import BF16_SYNC_TOLERANCE
    trainer = tiny(tok)
    engine = make_engine("static", trainer, tok, dtype=torch.bfloat16, tolerance=BF16_SYNC_TOLERANCE)
    assert engine.model is not trainer and next(engine.model.parameters()).dtype == torch.bfloat16
    assert engine.tolerance == BF16_SYNC_TOLERANCE
    engine.sync(trainer)
    perturb(trainer, 1e-2)
    assert engine.sync(trainer) <= 2e-2                                   # copied in: within bf16 rounding
    monkeypatch.setattr(sync_module, "load_weights", lambda engine_model, trainer_model: None)   # the load broken
    perturb(trainer, 1e-2)       # a move the engine misses: ~0.13 in log-prob, below the absolute tolerance
    with pytest.raises(WeightSyncError, match="did not follow"):
        engine.sync(trainer)
