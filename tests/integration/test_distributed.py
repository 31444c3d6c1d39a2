"""The RL stage across two ranks (torchrun + DDP on the gloo backend, as on two GPUs with NCCL)."""
import json
import shutil
import subprocess
import sys

import pandas as pd
import torch
import yaml

from tests.conftest import BIN, project_env


def test_rl_stage_on_two_ranks_keeps_weights_in_sync(smoke_project, tmp_path):
    """`alignflow stage rl` under ALIGNFLOW_LAUNCHER (as a GPU pool's job sets it): rank 0 runs the Prefect flow
    and writes; rank 1 trains alongside. CHORD's SFT term gives every step a non-zero gradient even where the
    smoke policy earns no reward, so ranks that did not average their gradients would diverge."""
    root = tmp_path / "copy"
    shutil.copytree(smoke_project, root, symlinks=True, ignore=shutil.ignore_patterns(".prefect", "mlruns*"))
    shutil.rmtree(root / "models/smoke/rl")
    raw = yaml.safe_load((root / "pipelines.yaml").read_text())
    raw["pipelines"]["smoke"]["rl"]["candidates"] = [
        {"name": "chord", "algorithm": "chord", "seeds": [0], "steps": 4, "checkpoints": [2, 4], "lr": 1e-3}]
    raw["pipelines"]["smoke"]["ope"]["top_k"] = 2
    (root / "pipelines.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**project_env(root), "OMP_NUM_THREADS": "1",
           "ALIGNFLOW_LAUNCHER": f"{sys.executable} -m torch.distributed.run --nproc_per_node 2"}
    proc = subprocess.run([str(BIN / "alignflow"), "stage", "rl", "--pipeline", "smoke"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    metrics = json.loads((root / "metrics/smoke/rl.json").read_text())
    assert metrics["candidates"] == ["chord-s0-2", "chord-s0-4"]
    curve = pd.read_csv(root / "metrics/smoke/rl_curve.csv")
    assert len(curve) == 4  # logged once, by rank 0
    assert (curve["rank_max_abs_diff"] <= 1e-4).all()  # the check itself raises when ranks diverge
    from transformers import AutoModelForCausalLM
    sft = AutoModelForCausalLM.from_pretrained(root / "models/smoke/sft")
    cand = AutoModelForCausalLM.from_pretrained(root / "models/smoke/rl/chord-s0-4")
    assert any(not torch.equal(a, b) for a, b in zip(sft.parameters(), cand.parameters()))


def _diverging_rank(rank: int, port: int, queue) -> None:
    import torch.distributed as dist
    from alignflow.train import distributed
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        distributed.check_in_sync(lambda: torch.tensor([-1.0, -2.0 - rank * 1e-2]))
        queue.put((rank, "in sync"))
    except distributed.RanksOutOfSyncError as err:
        queue.put((rank, str(err)))
    finally:
        dist.destroy_process_group()


def test_diverged_ranks_fail_the_sync_check():
    import socket
    ctx = torch.multiprocessing.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = ctx.Queue()
    procs = [ctx.Process(target=_diverging_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all("diverged" in msg and "1.00e-02" in msg for msg in results.values()), results


def test_single_process_is_untouched():
    from alignflow.train import distributed
    assert distributed.world_size() == 1 and distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.check_in_sync(lambda: 1 / 0) == 0.0  # never evaluated outside torchrun
