"""FSDP2 (`parallel.strategy: fsdp`) across two gloo ranks on CPU, as on N GPUs with NCCL: the tiny Qwen2 policy
sharded per decoder layer, against one process (the update, SFT) and against DDP (the RL loop, whose ranks sample
their own completions, so no single process draws the same rollouts). The ranks run tests/integration/fsdp_ranks.py
under torchrun; the one-process references run here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignflow.config import ConfigError, parse_project

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_ranks  # noqa: E402

WORKER = Path(fsdp_ranks.__file__)


def _torchrun(out: Path, strategy: str, *parts: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(WORKER),
                           strategy, str(out), *parts], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    """Two ranks under FSDP (the update, the RL loop with activation checkpointing, SFT, a stale engine), then the
    RL loop under DDP."""
    out = tmp_path_factory.mktemp("fsdp")
    for strategy, parts in (("fsdp", ("update", "rl", "sft", "stale_sync")), ("ddp", ("rl",))):
        proc = _torchrun(out, strategy, *parts)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def _assert_same_weights(got: dict, want: dict, atol: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name].float(), want[name].float(), rtol=0, atol=atol, msg=name)


def test_fsdp_update_takes_the_step_of_one_process(ranks):
    """Two ranks each holding half the groups, the policy sharded: two epochs of GRPO (two AdamW steps) move every
    weight as one process holding the whole batch does, with the same global loss (normalised over both ranks)."""
    sharded = torch.load(ranks / "update-fsdp.pt", weights_only=True)
    one = fsdp_ranks.update("ddp")   # no process group here: one process
    _assert_same_weights(sharded["weights"], one["weights"], atol=1e-5)
    assert sharded["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7)
    assert sharded["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    start = fsdp_ranks.tiny_policy()[0].state_dict()
    assert all(not torch.equal(start[k], one["weights"][k]) for k in start)   # the step moved every tensor


def test_fsdp_rl_loop_matches_ddp_and_writes_a_whole_snapshot(ranks):
    """The RL loop under FSDP (engines sampling from their gathered copies, activation checkpointing on) against
    the same loop under DDP: the same rewards, losses and final weights; every sync and rank check passed; the
    candidate snapshot is a plain save_pretrained folder that loads without torch.distributed."""
    from transformers import AutoModelForCausalLM
    fsdp, ddp = (torch.load(ranks / f"rl-{s}.pt", weights_only=False) for s in ("fsdp", "ddp"))
    assert len(fsdp["curve"]) == len(ddp["curve"]) == 3
    for a, b in zip(fsdp["curve"], ddp["curve"]):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)       # the same completions sampled
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["sync_max_abs_diff"] <= 1e-4 and a["rank_max_abs_diff"] <= 1e-4
    assert any(row["loss"] != 0 for row in fsdp["curve"])
    snapshot = Path(fsdp["snapshot"])
    assert (snapshot / "config.json").exists() and (snapshot / "model.safetensors").exists()
    assert not any(p.name.endswith(".distcp") for p in snapshot.rglob("*"))
    got = AutoModelForCausalLM.from_pretrained(snapshot).state_dict()
    want = AutoModelForCausalLM.from_pretrained(ddp["snapshot"]).state_dict()
    _assert_same_weights(got, want, atol=1e-5)
    start = fsdp_ranks.tiny_policy()[0].state_dict()
    assert any(not torch.equal(start[k], got[k]) for k in start)


def test_fsdp_sft_takes_the_steps_of_one_process(ranks, tmp_path):
    """SFT with each rank on half of every global batch, the loss normalised by the global batch's tokens: the same
    losses, validation (rank 0's gathered copy) and weights as one process; the consolidated output loads."""
    from transformers import AutoModelForCausalLM
    sharded = torch.load(ranks / "sft-fsdp.pt", weights_only=False)
    one = fsdp_ranks.sft("ddp", tmp_path)   # no process group here: one process
    assert [m["loss"] for m in sharded["curve"]] == pytest.approx([m["loss"] for m in one["curve"]], rel=1e-5)
    assert sharded["curve"][-1]["val_score"] == pytest.approx(one["curve"][-1]["val_score"], rel=1e-5)
    # AdamW at lr 1e-2 divides by sqrt(v): an element whose gradient is ~0 turns summation-order noise into a
    # visible move (seen: 1 element of 2,048 off by 2e-5), so weights are held to 1% of one step
    _assert_same_weights(sharded["weights"], one["weights"], atol=1e-4)
    saved = AutoModelForCausalLM.from_pretrained(ranks / "sft-fsdp").state_dict()
    _assert_same_weights(saved, sharded["weights"], atol=0)   # the consolidated output is the trained weights


def test_an_engine_copy_left_stale_fails_the_sync_check(ranks):
    """The gather into each rank's engine skipped (alignflow.rollout.sync.load_weights a no-op): the first sync
    after an update raises on both ranks, as a sync that did not take does on one GPU."""
    for rank in (0, 1):
        message = json.loads((ranks / f"stale_sync-rank{rank}.json").read_text())
        assert message.startswith("WeightSyncError") and "did not take" in message, message


def test_fsdp_killed_mid_run_resumes_both_ranks_from_the_same_step(tmp_path):
    """Sharded resume state every 2 steps; killed after step 3 (one rank SIGKILLed, torchrun stops the other), the
    run restarts and both ranks load their shards of step 2, then finish."""
    killed = _torchrun(tmp_path, "fsdp", "resume", ALIGNFLOW_FAULT="kill:rl:3")
    assert killed.returncode != 0 and not list(tmp_path.glob("resume-rank*.json"))
    state = tmp_path / "rl-fsdp" / "state"
    assert (state / "latest").read_text() == "step-0000002"
    assert list((state / "step-0000002" / "sharded").glob("*.distcp"))      # every rank's shards, no full copy
    resumed = _torchrun(tmp_path, "fsdp", "resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    results = [json.loads((tmp_path / f"resume-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["resumed_from"] for r in results] == [2, 2]
    assert len(results[0]["curve"]) == 3                                     # steps 3, 4, 5 logged by rank 0
    assert (Path(results[0]["snapshot"]) / "model.safetensors").exists()


@pytest.mark.parametrize("stage", ["rl", "sft"])
def test_parallel_settings_are_validated_naming_the_key(stage):
    base = {"tracked": ["p"], "pipelines": {"p": {}}}
    with pytest.raises(ConfigError) as err:
        parse_project({**base, "pipelines": {"p": {stage: {"parallel": {"strategy": "zero3"}}}}})
    assert f"p.{stage}.parallel.strategy: got 'zero3'; allowed: 'ddp' or 'fsdp'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_project({**base, "pipelines": {"p": {stage: {"parallel": {"sharding": True}}}}})
    assert f"p.{stage}.parallel.sharding: unknown key" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_project({**base, "pipelines": {"p": {stage: {"parallel": {"strategy": "fsdp"}, "lora": {}}}}})
    assert f"{stage}.parallel.strategy: fsdp does not combine with {stage}.lora" in str(err.value)
    assert parse_project(base).pipelines["p"].rl.parallel.strategy == "ddp"   # the default: as before


def test_fsdp_with_the_vllm_engine_is_refused():
    with pytest.raises(ConfigError, match="rl.parallel.strategy: fsdp does not combine with rl.engine vllm"):
        parse_project({"tracked": ["p"], "pipelines": {"p": {"rl": {"parallel": {"strategy": "fsdp"},
                                                                   "engine": "vllm"}}}})
