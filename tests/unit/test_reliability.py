"""Numerical trouble, out-of-memory and kill/resume in the supervised loop, by injected faults."""
import math
import os
import subprocess
import sys

import pytest
import torch

from alignflow.config import TinyModelConfig
from alignflow import models
from alignflow.models import build_tiny_model, build_tokenizer
from alignflow.train import supervised


def tiny_run(tmp_path, steps=6, fault="", ckpt_every=2, **kw):
    os.environ["ALIGNFLOW_FAULT"] = fault
    from alignflow import faults
    faults._fired.clear()
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_tiny_model(tok, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                                  intermediate_size=64))
    examples = models.sft_examples(tok, ["1+2=?", "3+4=?", "5+6=?"], ["1+2=3;A:3", "3+4=7;A:7", "5+6=11;A:11"])
    gen = torch.Generator().manual_seed(0)
    logs = []
    try:
        result = supervised.train_lm(model, supervised.sft_batches(examples, 4, tok.pad_token_id, gen), gen,
                                     steps=steps, lr=1e-3, ckpt_dir=tmp_path, checkpoint_every=ckpt_every,
                                     on_log=lambda s, m: logs.append(m), **kw)
    finally:
        os.environ.pop("ALIGNFLOW_FAULT", None)
    return model, logs, result


def test_nan_loss_skips_the_update_and_goes_on(tmp_path):
    _, logs, _ = tiny_run(tmp_path, fault="nan:train:3")
    assert [m["skipped_update"] for m in logs] == [0, 0, 1, 0, 0, 0]
    assert all(math.isfinite(m["loss"]) for i, m in enumerate(logs) if i != 2)


def test_nan_losses_in_a_row_abort_with_a_clear_message(tmp_path):
    with pytest.raises(supervised.NonFiniteLossError, match="3 non-finite losses in a row at step 3"):
        tiny_run(tmp_path, fault="nan:train:1,nan:train:2,nan:train:3", max_nonfinite=3)


def test_out_of_memory_halves_the_micro_batch_keeping_the_effective_batch(tmp_path):
    clean, _, _ = tiny_run(tmp_path / "a")
    halved, logs, _ = tiny_run(tmp_path / "b", fault="oom:train:2")
    assert [m["micro_batches"] for m in logs] == [1, 2, 2, 2, 2, 2]
    for p, q in zip(clean.parameters(), halved.parameters()):  # same updates, up to float summation order
        assert torch.allclose(p, q, atol=1e-5)


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL after step 3 (checkpoint at 2), rerun: it resumes from step 2 and ends where an uninterrupted
    run ends, bit for bit on CPU."""
    code = ("import sys; sys.path.insert(0, %r); from pathlib import Path; from tests.unit.test_reliability import "
            "tiny_run; tiny_run(Path(%r), fault=%r)")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    killed = subprocess.run([sys.executable, "-c", code % (repo, str(tmp_path / "k"), "kill:train:3")])
    assert killed.returncode == -9
    assert (tmp_path / "k" / "latest").read_text() == "step-0000002"
    resumed, _, result = tiny_run(tmp_path / "k")
    assert result.resumed_from == 2
    clean, _, _ = tiny_run(tmp_path / "c")
    for p, q in zip(clean.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_a_cut_dvc_rwlock_left_by_a_killed_run_is_moved_aside(tmp_path):
    from alignflow.versioning import recover_rwlock as recover_dvc_rwlock, run_lock
    rwlock = tmp_path / ".dvc" / "tmp" / "rwlock"
    rwlock.parent.mkdir(parents=True)
    rwlock.write_text('{"read": {}, "write": {}}')
    assert recover_dvc_rwlock(tmp_path) is False and rwlock.exists()  # a sound one stays
    rwlock.write_text('{"read": {"/x": [{"pid": 1')  # killed mid-write
    with run_lock(tmp_path):
        assert not rwlock.exists()
    assert [p.name.startswith("rwlock.corrupt-") for p in rwlock.parent.iterdir()] == [True]
