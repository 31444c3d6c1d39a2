"""DAPO ("DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv:2503.14476).

    A_i = (R_i - mean R) / (std R + eps)                                    (GRPO's advantage)
    L   = -(1 / sum_i |y_i|) sum_i sum_t min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i)
    eps_low = 0.2, eps_high = 0.28 ("clip-higher"), token-level mean, no KL term.
    Dynamic sampling: groups whose rewards are all equal (A = 0) are dropped and the batch is refilled with
    groups of newly drawn prompts until it holds `prompts_per_step` mixed groups.

Departures: refills draw exactly the missing number of prompts per try (the paper over-samples a generation
batch) and stop after `max_refill_tries` (the paper's max_num_gen_batches); a batch still short after that trains
on the mixed groups it has (and on the unfiltered batch when it has none, a no-op update under this advantage).
Overlong reward shaping / overlong filtering are not implemented (our completions are short and cut at
max_new_tokens).
"""
import torch

from alignflow.algorithms import grpo  # noqa: F401  (registers group_std)
from alignflow.algorithms.core import (ROLLOUTS, Algorithm, RolloutBatch, RolloutSource, concat_batches,
                                       register_algorithm, select_groups)


def mixed_groups(batch: RolloutBatch) -> list[int]:
    """Groups whose rewards are not all equal (the only ones with a non-zero group-relative advantage)."""
    n = batch.n_groups
    hi = torch.full((n,), -torch.inf).scatter_reduce(0, batch.group_ids, batch.rewards, "amax")
    lo = torch.full((n,), torch.inf).scatter_reduce(0, batch.group_ids, batch.rewards, "amin")
    return [g for g in range(n) if hi[g] > lo[g]]


@ROLLOUTS.register("dynamic_sampling")
def dynamic_sampling(source: RolloutSource, hp: dict) -> tuple[RolloutBatch, dict]:
    """prompts_per_step groups with mixed rewards, refilling at most max_refill_tries times."""
    want = source.prompts_per_step
    first = source.rollout(source.draw(want))
    kept = [select_groups(first, mixed_groups(first))]
    n_kept, tries, sampled = kept[0].n_groups, 0, want
    while n_kept < want and tries < int(hp["max_refill_tries"]):
        tries += 1
        more = source.rollout(source.draw(want - n_kept))
        sampled += more.n_groups
        kept.append(select_groups(more, mixed_groups(more)))
        n_kept += kept[-1].n_groups
    kept = [b for b in kept if b.n_groups > 0]
    metrics = {"dapo/kept_groups": min(n_kept, want), "dapo/refill_tries": tries, "dapo/sampled_prompts": sampled}
    if not kept:
        return first, metrics
    batch = concat_batches(kept, source.pad_id)
    return select_groups(batch, list(range(min(n_kept, want)))), metrics


DAPO = register_algorithm(Algorithm(
    name="dapo", summary="clip-higher (0.2/0.28), token mean, dynamic sampling of mixed-reward groups",
    advantage="group_std", policy_loss="clipped_ratio", loss_agg="token_mean", rollout="dynamic_sampling",
    needs=("verifier",), paper="arXiv:2503.14476",
    mini_batches=16,  # the paper: mini-batch 512 of 512 prompts x 16 responses, "16 gradient updates" per rollout
    defaults={"clip_eps": 0.2, "clip_eps_high": 0.28, "beta": 0.0, "adv_eps": 1e-4, "tis_cap": 2.0,
              "max_refill_tries": 3}))
