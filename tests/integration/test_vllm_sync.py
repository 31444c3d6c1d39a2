"""VLLMEngine's sync checks fail when the guarded thing breaks (marked vllm: needs .venv-vllm, built by the
fixtures of test_vllm_engine.py): trainer weights changed without a sync, and a sync that did not take although
the trainer moved less than the absolute tolerance."""
from __future__ import annotations

import pytest
import torch

from alignflow.rollout.engine import WeightSyncError
from tests.integration.test_vllm_engine import setup, vllm_env  # noqa: F401  (fixtures)

pytestmark = pytest.mark.vllm


def _perturb(model, scale):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def test_trainer_changed_without_a_sync_fails(setup):  # noqa: F811
    model, _, engine = setup
    engine.sync(model)
    engine.check_synced()
    _perturb(model, 1e-3)
    with pytest.raises(WeightSyncError, match="changed since the last sync"):
        engine.check_synced()
    engine.sync(model)
    engine.check_synced()


def test_a_sync_that_did_not_take_fails_below_the_tolerance(setup, monkeypatch):  # noqa: F811
    model, _, engine = setup
    engine.sync(model)
    monkeypatch.setattr(engine, "_push_weights", lambda model: None)   # the weights never reach vLLM
    monkeypatch.setattr(engine._synced, "tolerance", 1.0)             # the absolute check alone would pass
    _perturb(model, 5e-3)
    with pytest.raises(WeightSyncError, match="did not follow the trainer|differ from the trainer"):
        engine.sync(model)
