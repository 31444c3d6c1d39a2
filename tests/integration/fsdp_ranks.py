"""What tests/integration/test_fsdp.py runs on each rank (torchrun, gloo, CPU) and, for the one-process references,
in the test process itself: the tiny Qwen2 policy through the RL update, the RL loop and the SFT loop.

    python -m torch.distributed.run --nproc_per_node 2 tests/integration/fsdp_ranks.py STRATEGY OUT PART...

PART: update | rl | sft | stale_sync | resume. Rank 0 writes each part's results under OUT (torch.save files);
`resume` writes one JSON per rank.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from alignflow import models
from alignflow.config import CandidateConfig, ParallelConfig, RLConfig, TinyModelConfig
from alignflow.train import distributed, sharding

SHAPE = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
PROMPTS = [f"{a}+{b}=?" for a, b in ((12, 34), (5, 7), (40, 2), (9, 9), (23, 11), (3, 60), (18, 18), (7, 70))]


def tiny_policy():
    torch.manual_seed(0)
    tokenizer = models.build_tokenizer()
    return models.build_tiny_model(tokenizer, SHAPE), tokenizer


def full_weights(model) -> dict:
    """The whole model's weights on rank 0 (every rank calls this)."""
    if sharding.is_sharded(model):
        return sharding.full_state_dict(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def varied_reward(prompts, completions, **columns):
    """A reward that differs between completions of one prompt (an untrained policy earns no accuracy)."""
    return [(len(c) % 3) / 2 for c in completions]


# ---------------------------------------------------------------- the update on a fixed batch
def global_batch(model):
    """8 responses in 4 groups of 2, completion lengths 1..6; pi_old a little away from the policy."""
    from alignflow.algorithms import RolloutBatch
    from alignflow.train.logprobs import policy_logprobs
    g = torch.Generator().manual_seed(1)
    P, T = 4, 6
    ids = torch.randint(5, 40, (8, P + T), generator=g)
    lengths = torch.tensor([6, 2, 5, 1, 3, 6, 4, 2])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    with torch.no_grad():
        old = (policy_logprobs(model, ids, torch.ones_like(ids), T) - 0.05 * torch.arange(T)) * mask
    return RolloutBatch(input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=mask,
                        rewards=torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.5]),
                        group_ids=torch.arange(4).repeat_interleave(2), old_logprobs=old,
                        rollout_logprobs=old.clone(), prompts=[f"p{i}" for i in range(4)], step=0, total_steps=4)


def update(strategy: str) -> dict:
    """Two PPO epochs of GRPO on the fixed batch (one mini-batch: the union of the ranks' rows); each rank holds 2
    of the 4 groups."""
    from alignflow.algorithms import ADVANTAGES, ALGORITHMS
    from alignflow.train.rl import _Scorer
    from alignflow.train.update import UpdateCounters, rows_of, update_policy
    model, _ = tiny_policy()
    batch = global_batch(model)
    rows = torch.arange(8).tensor_split(distributed.world_size())[distributed.rank()]
    part = rows_of(batch, rows)
    part.group_ids = part.group_ids - part.group_ids.min()
    part.prompts = [batch.prompts[int(g)] for g in batch.group_ids[rows].unique()]
    algo = ALGORITHMS["grpo"]
    hp = algo.hparams({})
    adv = ADVANTAGES[algo.advantage](part, hp)
    trainer = distributed.wrap(_Scorer(model), ParallelConfig(strategy=strategy))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    metrics = update_policy(trainer, model, optimizer, scheduler, part, adv, part.completion_mask.float(), algo, hp,
                            RLConfig(mini_batches=1, ppo_epochs=2), UpdateCounters(), 5, 0)
    return {"weights": full_weights(model), "loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}


# ---------------------------------------------------------------- the RL loop
def rl_config(strategy: str, checkpointing: bool = False) -> RLConfig:
    return RLConfig(prompts_per_step=4, group_size=2, max_new_tokens=6, checkpoint_every=2,
                    parallel=ParallelConfig(strategy=strategy, activation_checkpointing=checkpointing))


def rl(strategy: str, out: Path, steps: int = 3, checkpointing: bool = False) -> dict:
    from alignflow.data.rows import TaskRows
    from alignflow.train.rl import train_candidate
    model, tokenizer = tiny_policy()
    rows = TaskRows.from_texts(PROMPTS, answer=["0"] * len(PROMPTS))
    cand = CandidateConfig(name="grpo", seeds=[0], steps=steps, checkpoints=[steps], lr=1e-2)
    curve = []
    result = train_candidate(model, tokenizer, cand, 0, rl_config(strategy, checkpointing), rows, None,
                             out / f"rl-{strategy}", on_log=lambda step, m: curve.append(m), reward_fn=varied_reward)
    return {"curve": curve, "snapshot": str(result.snapshots[-1]), "resumed_from": result.resumed_from}


# ---------------------------------------------------------------- the SFT loop
def sft(strategy: str, out: Path) -> dict:
    from alignflow.train import supervised
    model, tokenizer = tiny_policy()
    answers = [str(sum(int(x) for x in p.removesuffix("=?").split("+"))) for p in PROMPTS]
    examples = models.sft_examples(tokenizer, [[{"role": "user", "content": p}] for p in PROMPTS], answers,
                                   stop_ids=models.eos_ids(model, tokenizer))
    generator = torch.Generator().manual_seed(0)
    probe = torch.tensor([examples[0][0]])
    curve = []

    def validate(policy=None) -> dict:   # the mean log-likelihood of a demonstration, by the full weights
        with torch.no_grad():
            return {"val_score": -float((model if policy is None else policy)(probe, labels=probe).loss)}

    supervised.train_lm(model, supervised.sft_batches(examples, 8, tokenizer.pad_token_id, generator), generator,
                        steps=3, lr=1e-2, ckpt_dir=out / f"sft-{strategy}-ckpt", checkpoint_every=2,
                        on_log=lambda step, m: curve.append(m), validate=validate, validate_every=3,
                        parallel=ParallelConfig(strategy=strategy, activation_checkpointing=strategy == "fsdp"))
    models.save(model, tokenizer, out / f"sft-{strategy}")   # every rank: a sharded model is gathered to rank 0
    return {"curve": curve, "weights": full_weights(model)}


# ---------------------------------------------------------------- a sync that does not take
def stale_sync(out: Path) -> str:
    """The RL loop under FSDP with the gather into each rank's engine skipped: the sync check must fire."""
    from alignflow.rollout import sync
    real, sync.load_weights = sync.load_weights, lambda engine_model, trainer_model: None
    try:
        rl("fsdp", out / "stale", steps=2)
        return "no error"
    except sync.WeightSyncError as err:
        return f"WeightSyncError: {err}"
    finally:
        sync.load_weights = real


def main(strategy: str, out: str, *parts: str) -> None:
    out = Path(out)
    with distributed.process_group():
        for part in parts:
            if part == "update":
                result = update(strategy)
            elif part == "rl":
                result = rl(strategy, out, checkpointing=strategy == "fsdp")
            elif part == "sft":
                result = sft(strategy, out)
            elif part == "stale_sync":
                result = stale_sync(out)
                (out / f"stale_sync-rank{distributed.rank()}.json").write_text(json.dumps(result))
                continue
            elif part == "resume":
                result = rl(strategy, out, steps=5)
                (out / f"resume-rank{distributed.rank()}.json").write_text(json.dumps(result))
                continue
            else:
                raise SystemExit(f"unknown part {part!r}")
            if distributed.is_main():
                torch.save(result, out / f"{part}-{strategy}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
