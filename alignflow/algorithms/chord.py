"""CHORD ("On-Policy RL Meets Off-Policy Experts: Harmonizing Supervised Fine-Tuning and Reinforcement Learning via
Dynamic Weighting", arXiv:2508.11408). One objective over a batch that mixes on-policy groups with expert
demonstrations (the loop appends them: need "expert", share `expert_share` of the rows):

    L = (1 - mu) * L_GRPO + mu * L_SFT
    L_SFT = -(1 / sum|y*|) sum_t phi(p_t) log pi_theta(y*_t),  p_t = pi_theta(y*_t) detached

CHORD-mu (default): phi = 1 and mu follows a schedule, a linear warm-up to mu_peak, then a cosine decay to
mu_valley, held there. CHORD-phi: phi(p) = p (1 - p) (down-weights tokens the policy already knows and tokens far
from its distribution) with a constant mu: set phi = 1 and mu_peak = mu_valley = 0.1.

Constants from the authors' Trinity-RFT example (mix_chord.yaml): CHORD-mu peak 0.9, valley 0.05, no warm-up;
CHORD-phi mu 0.1; expert share 0.2 of the batch. Departures: warm-up and decay lengths are fractions of the run
(mu_warmup, mu_decay) rather than step counts (their example decays over 200 steps); both halves are token means
(L_GRPO over the sampled rows' tokens, L_SFT over the expert rows'), pre-weighted so the batch token mean
(`token_mean`) equals (1 - mu) L_GRPO + mu L_SFT.
"""
import math

import torch

from alignflow.algorithms import grpo  # noqa: F401  (registers group_std)
from alignflow.algorithms.core import (POLICY_LOSSES, Algorithm, BatchCounts, RolloutBatch, clipped_ratio,
                                       register_algorithm)


def chord_mu(step: int, total_steps: int, hp: dict) -> float:
    """Warm-up to mu_peak over mu_warmup of the run, cosine decay to mu_valley over the next mu_decay, then flat."""
    progress, warm, decay = step / max(total_steps, 1), hp["mu_warmup"], hp["mu_decay"]
    if progress < warm:
        return progress / warm * hp["mu_peak"]
    if decay <= 0 or progress >= warm + decay:
        return hp["mu_valley"]
    cosine = 0.5 * (1 + math.cos(math.pi * (progress - warm) / decay))
    return hp["mu_valley"] + (hp["mu_peak"] - hp["mu_valley"]) * cosine


def phi(p: torch.Tensor) -> torch.Tensor:
    """CHORD-phi token weight p (1 - p): 0 for tokens with probability 0 or 1, largest at p = 0.5."""
    return p * (1 - p)


@POLICY_LOSSES.register("chord")
def chord_loss(logp: torch.Tensor, batch: RolloutBatch, adv: torch.Tensor, hp: dict):
    rl_loss, metrics = clipped_ratio(logp, batch, adv, hp)                           # [B, T]
    weight = phi(logp.detach().exp()) if hp["phi"] else torch.ones_like(logp)
    sft_loss = -weight * logp                                                         # [B, T]
    expert = batch.is_expert[:, None]                                                 # [B, 1]
    mask = batch.completion_mask.float()
    # token counts of the loss's whole (mini-)batch, over every rank under DDP: the loop puts them in extras,
    # so a micro-batch slice still scales by the batch's counts; without them, this batch's own
    counts = batch.extras.get("counts") or BatchCounts.of(mask, batch.is_expert)
    n_all, n_sft = torch.tensor(counts.tokens), torch.tensor(counts.expert_tokens)
    n_rl = n_all - n_sft
    mu = chord_mu(batch.step, batch.total_steps, hp)
    # token_mean divides by n_all; these factors turn it into (1 - mu) mean_RL + mu mean_SFT
    token_loss = torch.where(expert, mu * sft_loss * n_all / n_sft.clamp(min=1),
                             (1 - mu) * rl_loss * n_all / n_rl.clamp(min=1))
    sft_nll = (-logp.detach() * mask * expert).sum() / n_sft.clamp(min=1)
    metrics.update({"chord/mu": mu, "chord/sft_nll": sft_nll.item()})
    return token_loss, metrics


CHORD = register_algorithm(Algorithm(
    name="chord", summary="(1 - mu) GRPO + mu SFT on mixed-in expert demonstrations; mu schedule (CHORD-mu) "
                          "or p(1-p) token weights (CHORD-phi)",
    advantage="group_std", policy_loss="chord", loss_agg="token_mean",
    needs=("verifier", "expert"), paper="arXiv:2508.11408",
    defaults={"clip_eps": 0.2, "beta": 0.0, "adv_eps": 1e-4, "tis_cap": 2.0, "expert_share": 0.2,
              "mu_peak": 0.9, "mu_valley": 0.05, "mu_warmup": 0.0, "mu_decay": 0.5, "phi": 0.0}))
