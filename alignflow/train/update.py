"""The update of the RL loop (alignflow/train/rl.py): ppo_epochs x mini-batches optimizer steps per rollout, each
a forward/backward of the preset's policy loss in micro-batches, gradients accumulated exactly. Its own module so
the math of the update is read (and mutation-tested) apart from the rollout plumbing.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields, replace

import torch

from alignflow import faults
from alignflow.algorithms import LOSS_AGGS, POLICY_LOSSES, RewardHistory, RolloutBatch
from alignflow.algorithms.core import BatchCounts
from alignflow.config import RLConfig
from alignflow.train import distributed
from alignflow.train.memory import retry_in_halves


class NonFiniteLossError(RuntimeError):
    pass


def rows_of(batch: RolloutBatch, rows: torch.Tensor) -> RolloutBatch:
    """The batch restricted to `rows` (every per-response tensor; per-group and scalar fields kept as they are;
    extras copied, so the loss's BatchCounts in extras["counts"] travel with a slice)."""
    n = len(batch.rewards)
    return replace(batch, extras=dict(batch.extras),
                   **{f.name: value[rows.to(value.device)] for f in fields(batch)
                      if isinstance(value := getattr(batch, f.name), torch.Tensor) and value.shape[:1] == (n,)})


def _policy_loss_backward(scorer, batch: RolloutBatch, adv: torch.Tensor, mask: torch.Tensor, algo, hp: dict,
                          cfg: RLConfig, micro_batches: int, where: tuple[str, int]) -> tuple[torch.Tensor, dict]:
    """Forward and backward of the policy loss in `micro_batches` row slices, gradients accumulated. Every loss
    aggregation is linear in the per-token loss with weights that depend on the batch's counts only
    (extras["counts"], global under DDP), so a slice's share is the aggregate of a [B, T] loss that holds just its
    rows, and the shares sum to the one-pass loss (and gradient) exactly. DDP all-reduces once, on the last slice,
    and averages over the ranks: each rank's share is scaled by the world size, so the average of the ranks'
    gradients is the gradient of the global loss. -> (this rank's part of the global loss, metrics)"""
    n, T = mask.shape
    slices = torch.arange(n).tensor_split(micro_batches)
    total, metrics = torch.zeros((), device=mask.device), {}
    for i, rows in enumerate(slices):
        last = i == len(slices) - 1
        part, at = rows_of(batch, rows), rows.to(mask.device)
        with contextlib.nullcontext() if last or not hasattr(scorer, "no_sync") else scorer.no_sync():
            faults.maybe_oom(*where)
            logp = scorer(part.input_ids, part.attention_mask, T, cfg.temperature)
            token_loss, part_metrics = POLICY_LOSSES[algo.policy_loss](logp, part, adv[at], hp)
            share = LOSS_AGGS[algo.loss_agg](token_loss.new_zeros(n, T).index_copy(0, at, token_loss), mask, hp,
                                             batch.extras.get("counts"))
            share = faults.maybe_nan(*where, share) if last else share
            (share * distributed.world_size()).backward()
        total += share.detach()
        weight = float(mask[at].sum() / mask.sum().clamp(min=1))  # token-weighted: token metrics stay exact
        for key, value in part_metrics.items():
            metrics[key] = metrics.get(key, 0.0) + float(value) * weight
    return total, metrics


def global_counts(mask: torch.Tensor, is_expert: torch.Tensor | None) -> BatchCounts:
    """The loss's normalisers for a mini-batch: rows, tokens and expert tokens summed over the ranks, the longest
    completion their maximum (DAPO's and POPE's row counts differ between ranks; so do completion lengths)."""
    local = BatchCounts.of(mask, is_expert)
    rows, tokens, expert = distributed.sum_across_ranks([local.rows, local.tokens, local.expert_tokens])
    return BatchCounts(rows=rows, tokens=tokens, width=distributed.max_across_ranks(local.width),
                       expert_tokens=expert)


def shared_history_update(history: RewardHistory, prompts: list[str], rewards: torch.Tensor,
                          group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DCPO's per-prompt history updated with every rank's groups of this step, as one process holding the whole
    batch would (a prompt drawn on two ranks counts twice, both groups in its statistics), so every rank keeps the
    same, complete state and rank 0's checkpoint of it is every rank's. -> this rank's rows' (times_seen, mean,
    std)"""
    parts = distributed.all_gather_objects((list(prompts), rewards.tolist(), group_ids.tolist()))
    all_prompts, all_rewards, all_groups = [], [], []
    for r, (their_prompts, their_rewards, their_groups) in enumerate(parts):
        if r == distributed.rank():
            mine = slice(len(all_rewards), len(all_rewards) + len(their_rewards))
        all_groups += [g + len(all_prompts) for g in their_groups]
        all_prompts += their_prompts
        all_rewards += their_rewards
    stats = history.update(all_prompts, torch.tensor(all_rewards), torch.tensor(all_groups))
    return tuple(s[mine] for s in stats)


@dataclass
class UpdateCounters:
    """State of the update across steps: rows per forward (None = a whole mini-batch; shrunk after an
    out-of-memory retry) and non-finite updates skipped (in a row: abort at max_nonfinite; in all)."""
    slice_rows: int | None = None
    nonfinite_in_row: int = 0
    skipped: int = 0

    def skip(self, max_nonfinite: int, step: int) -> None:
        self.nonfinite_in_row, self.skipped = self.nonfinite_in_row + 1, self.skipped + 1
        if self.nonfinite_in_row >= max_nonfinite:
            raise NonFiniteLossError(f"{self.nonfinite_in_row} non-finite losses/gradients in a row at step "
                                     f"{step + 1}; lower rl.candidates.*.lr or check the reward")


def update_policy(scorer, model, optimizer, scheduler, batch: RolloutBatch, adv, mask, algo, hp: dict, cfg: RLConfig,
            counters: UpdateCounters, max_nonfinite: int, step: int) -> dict:
    """ppo_epochs passes over the rollout batch, each split into mini-batches (contiguous rows, no shuffle, as
    verl's default) with one optimizer step per mini-batch: TRL's num_iterations x steps_per_generation, verl's
    ppo_epochs x (train_batch_size / ppo_mini_batch_size). old_logprobs and advantages stay those of the
    rollout, so after the first step the ratio leaves 1 and the clips bind. A mini-batch is the loss's batch:
    its aggregation normalises over the mini-batch's own tokens and rows (verl does the same), and the
    micro-batches inside it accumulate to that exactly. Under DDP the k-th mini-batch is the union of every rank's
    k-th, normalised by the counts of that union. The scheduler steps with the optimizer, never on a
    skipped (non-finite) update. -> metrics averaged over the optimizer steps"""
    n = len(batch.rewards)
    n_mini = distributed.min_across_ranks(min(cfg.mini_batches or algo.mini_batches, n))  # same count on all ranks
    per_step = []
    for _ in range(cfg.ppo_epochs):
        for rows in torch.arange(n).tensor_split(n_mini):
            mini, at = rows_of(batch, rows), rows.to(mask.device)
            mini.extras["counts"] = global_counts(mask[at], mini.is_expert)
            slices = math.ceil(len(rows) / (counters.slice_rows or len(rows)))
            (loss, loss_metrics), used = retry_in_halves(
                lambda k: _policy_loss_backward(scorer, mini, adv[at], mask[at], algo, hp, cfg, k, ("rl", step + 1)),
                slices, len(rows), optimizer, f"rl step {step + 1}")
            if used > slices:  # out of memory: keep the smaller slices for the rest of the run
                counters.slice_rows = math.ceil(len(rows) / used)
            loss = distributed.sum_across_ranks(loss)   # the global loss: every rank skips (or steps) alike
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            per_step.append({"loss": loss.item(), "grad_norm": grad_norm.item(), "micro_batches": used,
                             **loss_metrics})
            if not (math.isfinite(loss.item()) and math.isfinite(grad_norm.item())):
                optimizer.zero_grad(set_to_none=True)
                counters.skip(max_nonfinite, step)
                continue
            counters.nonfinite_in_row = 0
            optimizer.step()
            scheduler.step()
    applied = len(per_step) - sum(not math.isfinite(s["loss"] + s["grad_norm"]) for s in per_step)
    keys = {k for s in per_step for k in s}
    means = {k: sum(s[k] for s in per_step if k in s) / sum(k in s for s in per_step) for k in keys}
    return {**means, "micro_batches": per_step[-1]["micro_batches"], "mini_batches": n_mini,
            "optimizer_steps": applied, "lr": scheduler.get_last_lr()[0]}
