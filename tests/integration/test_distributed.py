"""The RL stage across two ranks (torchrun + DDP on the gloo backend, as on two GPUs with NCCL)."""
import json
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest
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


def test_two_rank_rl_killed_mid_way_resumes_both_ranks_from_the_same_step(smoke_project, tmp_path):
    """Both ranks open the stage from the one stage table, so they compute the same resume key (config + input
    hashes) and find the same checkpoint: killed after step 3 (checkpointed at 2), both resume from step 2."""
    root = tmp_path / "copy"
    shutil.copytree(smoke_project, root, symlinks=True, ignore=shutil.ignore_patterns(".prefect", "mlruns*"))
    shutil.rmtree(root / "models/smoke/rl")
    (root / "metrics/smoke/rl.json").unlink()
    raw = yaml.safe_load((root / "pipelines.yaml").read_text())
    raw["pipelines"]["smoke"]["rl"].update(checkpoint_every=2, candidates=[
        {"name": "chord", "algorithm": "chord", "seeds": [0], "steps": 5, "checkpoints": [2, 5], "lr": 1e-3}])
    raw["pipelines"]["smoke"]["ope"]["top_k"] = 2
    (root / "pipelines.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**project_env(root), "OMP_NUM_THREADS": "1",
           "ALIGNFLOW_LAUNCHER": f"{sys.executable} -m torch.distributed.run --nproc_per_node 2"}
    cmd = [str(BIN / "alignflow"), "stage", "rl", "--pipeline", "smoke"]

    def run(log, **extra_env) -> int:  # output to a file: every process that inherited a pipe would hold it open
        with open(tmp_path / log, "w") as out:
            return subprocess.run(cmd, cwd=root, env={**env, **extra_env}, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=600).returncode
    assert run("killed.log", ALIGNFLOW_FAULT="kill:rl:3") != 0 and not (root / "metrics/smoke/rl.json").exists()
    code = run("resumed.log")
    out = (tmp_path / "resumed.log").read_text(errors="replace")
    assert code == 0, out[-6000:]
    # a rank's warning can share its line with another rank's progress bar: match the message, not the line
    resumed = sorted(re.findall(r"rank (\d) resumes from step (\d+) \(([^)]*)\)", out))
    assert [(rank, step) for rank, step, _ in resumed] == [("0", "2"), ("1", "2")], out[-3000:]
    assert resumed[0][2] == resumed[1][2]  # the same checkpoint folder
    assert json.loads((root / "metrics/smoke/rl.json").read_text())["candidates"] == ["chord-s0-2", "chord-s0-5"]
    assert pd.read_csv(root / "metrics/smoke/rl_curve.csv")["step"].max() == 5


def _two_gloo_ranks(target, *args, timeout: float = 300) -> dict:
    """Run target(rank, port, *args, queue) in 2 spawned processes; -> {rank: what each put on the queue}."""
    import socket
    ctx = torch.multiprocessing.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, *args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return results


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
    results = _two_gloo_ranks(_diverging_rank, timeout=120)
    assert all("diverged" in msg and "1.00e-02" in msg for msg in results.values()), results


def test_single_process_is_untouched():
    from alignflow.train import distributed
    assert distributed.world_size() == 1 and distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.check_in_sync(lambda: 1 / 0) == 0.0  # never evaluated outside torchrun


# ---------------------------------------------------------------- global normalisation: 2 gloo ranks == 1 process
LENGTHS = [2, 1, 2, 2, 4, 3, 1, 4, 2]          # rank 0: rows 0-3 (longest 2), rank 1: rows 4-8 (longest 4)
GROUPS = [0, 0, 1, 1, 2, 2, 3, 3, 4]           # whole groups per rank; row 8 an expert row (CHORD), its own group
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
RANK_ROWS = [list(range(0, 4)), list(range(4, 9))]   # variable row counts per rank, as DAPO's and POPE's


class _Toy(torch.nn.Module):
    """Context-free policy log_softmax(w)[token]: the same call as rl._Scorer."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.1, 0.5, -0.4]))

    def forward(self, input_ids, attention_mask, completion_len, temperature):
        return torch.log_softmax(self.w / temperature, -1)[input_ids[:, -completion_len:]]


def _global_batch():
    from alignflow.algorithms import RolloutBatch
    T = max(LENGTHS)
    ids = torch.tensor([[(3 * i + t) % 5 for t in range(T)] for i in range(len(LENGTHS))])
    mask = torch.tensor([[1 if t < n else 0 for t in range(T)] for n in LENGTHS])
    with torch.no_grad():
        old = (_Toy()(ids, None, T, 1.0) - 0.05 * torch.arange(T)) * mask      # pi_old != pi: ratios != 1
    return RolloutBatch(input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=mask,
                        rewards=torch.tensor(REWARDS), group_ids=torch.tensor(GROUPS), old_logprobs=old,
                        rollout_logprobs=old.clone(), is_expert=torch.tensor([False] * 8 + [True]),
                        prompts=[f"p{g}" for g in range(5)], step=1, total_steps=4)


def _shard(batch, rows):
    """This rank's rows, trimmed to its own longest completion (each rank's rollout pads to its own)."""
    from alignflow.train.update import rows_of
    part = rows_of(batch, torch.tensor(rows))
    T = int(part.completion_mask.sum(-1).max())
    first = part.group_ids.min()
    part.group_ids = part.group_ids - first
    for name in ("input_ids", "attention_mask", "completion_mask", "old_logprobs", "rollout_logprobs"):
        setattr(part, name, getattr(part, name)[:, :T])
    part.prompts = batch.prompts[int(first):int(part.group_ids.max() + first) + 1]
    return part


def _train(algo_name, batch, adv, scorer, policy):
    from alignflow.algorithms import ALGORITHMS
    from alignflow.config import RLConfig
    from alignflow.train.update import UpdateCounters, update_policy
    algo = ALGORITHMS[algo_name]
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)   # SGD: a wrong normaliser shows as a wrong step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    metrics = update_policy(scorer, policy, optimizer, scheduler, batch, adv, batch.completion_mask.float(), algo,
                            algo.hparams({}), RLConfig(mini_batches=1, ppo_epochs=2, grad_clip=1e9), UpdateCounters(),
                            5, 0)
    return policy.w.detach().clone(), metrics["loss"]


def _advantage(algo_name, batch):
    from alignflow.algorithms import ADVANTAGES, ALGORITHMS
    algo = ALGORITHMS[algo_name]
    return ADVANTAGES[algo.advantage](batch, algo.hparams({}))


def _normalising_rank(rank: int, port: int, algos, queue) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out = {}
        for name in algos:
            part = _shard(_global_batch(), RANK_ROWS[rank])
            policy = _Toy()
            scorer = torch.nn.parallel.DistributedDataParallel(policy)
            w, loss = _train(name, part, _advantage(name, part), scorer, policy)
            out[name] = (w.tolist(), loss)          # plain lists: tensors would need the child alive to be read
        queue.put((rank, out))
    except Exception as err:  # noqa: BLE001  (reported to the parent, which fails the test)
        queue.put((rank, repr(err)))
    finally:
        dist.destroy_process_group()


ALGOS = ["grpo", "dapo", "dr_grpo", "chord"]   # seq_mean_token_mean, token_mean, token_sum_norm, CHORD's counts


def test_two_ranks_normalise_like_one_process():
    """Every aggregation's normaliser (rows, tokens, the longest completion, CHORD's expert / on-policy token
    counts) is the global batch's: two gloo ranks holding different row counts and completion lengths take
    the same two SGD steps, and report the same loss, as one process holding every row."""
    results = _two_gloo_ranks(_normalising_rank, ALGOS, timeout=300)
    assert all(isinstance(r, dict) for r in results.values()), results
    for name in ALGOS:
        whole = _global_batch()
        policy = _Toy()
        w, loss = _train(name, whole, _advantage(name, whole), policy, policy)
        for rank in (0, 1):
            torch.testing.assert_close(torch.tensor(results[rank][name][0]), w, rtol=1e-5, atol=1e-6,
                                       msg=f"{name} rank {rank}")
            assert results[rank][name][1] == pytest.approx(loss, rel=1e-5), name


def _history_rank(rank: int, port: int, queue) -> None:
    import torch.distributed as dist
    from alignflow.algorithms import RewardHistory
    from alignflow.train.update import shared_history_update
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        history = RewardHistory()
        prompts = [["a", "b"], ["b", "c"]][rank]               # "b" drawn on both ranks this step
        rewards = [torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 0.5, 1.0])][rank]
        stats = shared_history_update(history, prompts, rewards, torch.tensor([0, 0, 1, 1]))
        queue.put((rank, ([s.tolist() for s in stats], history.state_dict()["prompts"],
                          history.state_dict()["stats"].tolist())))
    finally:
        dist.destroy_process_group()


def test_every_rank_holds_the_whole_reward_history():
    """DCPO's per-prompt history: each rank adds every rank's groups, so all ranks (and rank 0's checkpoint) hold
    the state one process would, and each rank's rows get the statistics one process would give them."""
    from alignflow.algorithms import RewardHistory
    results = _two_gloo_ranks(_history_rank, timeout=300)
    one = RewardHistory()
    times, mean, std = one.update(["a", "b", "b", "c"], torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5, 1.0]),
                                  torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    state = one.state_dict()
    for rank, rows in ((0, slice(0, 4)), (1, slice(4, 8))):
        stats, prompts, table = results[rank]
        assert prompts == state["prompts"] and table == state["stats"].tolist()
        for got, want in zip(stats, (times, mean, std)):
            assert got == pytest.approx(want[rows].tolist())
