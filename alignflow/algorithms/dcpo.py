"""DCPO ("DCPO: Dynamic Clipping Policy Optimization", arXiv:2509.02333).

Dynamic-adaptive clipping: bounding |(r - 1) p| <= eps with p = r q, q = pi_old(y_t), gives per-token bounds
    lower(q) = 0.5 + 0.5 sqrt(max(0, 1 - 4 eps_low / q))
    upper(q) = min(0.5 + 0.5 sqrt(1 + 4 eps_high / q), 10)
(about 1 -/+ eps at q = 1; rare tokens get wider room). eps_low = 0.16, eps_high = 0.2 (the paper's).

Smooth advantage standardisation (SAS), for a prompt trained on for the i-th time:
    A_new   = (R - mean_step) / std_step            (this step's group)
    A_total = (R - mean_all) / std_all              (all its samples so far, this step included)
    SA_new = (i-1)/i A_new + 1/i A_total,  SA_total = 1/i A_new + (i-1)/i A_total
    A = whichever of SA_new, SA_total has the smaller |.|
Aggregation: "only-token-mean", a token mean (`token_mean`).

Departures: a zero std gives a zero standardised term (as in the authors' code). Cumulative statistics are exact
running sums over all samples (the authors pool per-step (mean, std) pairs); std is unbiased (ddof 1). The
authors' OTM takes the token mean per micro-batch and sums micro-batches; with one batch per update that is the
batch token mean used here. The cap 10 on the upper bound is their clip_ratio_c; we do not add their extra
dual-clip on negative advantages.
"""
import torch

from alignflow.algorithms.core import (ADVANTAGES, POLICY_LOSSES, Algorithm, RolloutBatch, add_kl_penalty,
                                       clip_surrogate, group_stats, masked_mean, per_token, register_algorithm,
                                       standardise, tis_weight)


def dynamic_bounds(q: torch.Tensor, eps_low: float, eps_high: float, cap: float = 10.0):
    """Per-token ratio bounds from the old probability q. -> (lower, upper), each shaped like q."""
    lower = 0.5 + 0.5 * torch.sqrt((1 - 4 * eps_low / q).clamp(min=0))
    upper = (0.5 + 0.5 * torch.sqrt(1 + 4 * eps_high / q)).clamp(max=cap)
    return lower, upper


@POLICY_LOSSES.register("dynamic_clip")
def dynamic_clip(logp: torch.Tensor, batch: RolloutBatch, adv: torch.Tensor, hp: dict):
    """PPO surrogate clipped to [lower(q), upper(q)], q = pi_old(y_t); TIS and optional KL as clipped_ratio."""
    lower, upper = dynamic_bounds(batch.old_logprobs.exp(), hp["clip_eps"], hp["clip_eps_high"], hp["clip_cap"])
    loss, clipped = clip_surrogate(torch.exp(logp - batch.old_logprobs), adv, lower, upper)
    metrics = {"clip_frac": masked_mean(clipped.float(), batch.completion_mask),    # generated tokens only
               "dcpo/upper_mean": masked_mean(upper, batch.completion_mask)}
    return add_kl_penalty(loss * tis_weight(batch, hp), logp, batch, hp, metrics), metrics


def smooth_standardised(rewards, step_mean, step_std, total_mean, total_std, times_seen, eps: float) -> torch.Tensor:
    """SAS for rewards [B] given this step's and the cumulative statistics and i = times_seen. -> [B]"""
    a_new = standardise(rewards, step_mean, step_std, eps)
    a_total = standardise(rewards, total_mean, total_std, eps)
    i = times_seen
    sa_new = (i - 1) / i * a_new + 1 / i * a_total
    sa_total = 1 / i * a_new + (i - 1) / i * a_total
    return torch.where(sa_new.abs() < sa_total.abs(), sa_new, sa_total)


@ADVANTAGES.register("smooth_standardised")
def sas_advantage(batch: RolloutBatch, hp: dict) -> torch.Tensor:
    step_mean, step_std = group_stats(batch.rewards, batch.group_ids)
    adv = smooth_standardised(batch.rewards, step_mean, step_std, batch.history_mean, batch.history_std,
                              batch.times_seen, hp["adv_eps"])
    return per_token(adv, batch)


DCPO = register_algorithm(Algorithm(
    name="dcpo", summary="token-adaptive clip bounds from pi_old, smooth advantage standardisation, token mean",
    advantage="smooth_standardised", policy_loss="dynamic_clip", loss_agg="token_mean",
    needs=("verifier", "history"), paper="arXiv:2509.02333",
    mini_batches=16,  # DAPO's 16 updates per rollout (DCPO's baseline setup); DCPO's own value unconfirmed
    defaults={"clip_eps": 0.16, "clip_eps_high": 0.2, "clip_cap": 10.0, "beta": 0.0, "adv_eps": 1e-4,
              "tis_cap": 2.0}))
