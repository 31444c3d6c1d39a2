"""AsymRE, asymmetric REINFORCE ("Asymmetric REINFORCE for off-Policy Reinforcement Learning: Balancing positive
and negative rewards", arXiv:2506.20520; in the group-relative family of arXiv:2509.24203):

    A_i = R_i - (mean_group R - delta),   delta >= 0      (baseline shifted below the mean)
    L   = -(1/B) sum_i A_i (1/|y_i|) sum_t log pi_theta(y_i,t)

delta = 0.1 (Trinity-RFT's default baseline_shift = -0.1). A positive delta leans on positive rewards, which the
paper shows keeps off-policy REINFORCE stable.

Departure: the sequence log-prob is length-normalised (seq_mean_token_mean), as for OPMD here; the paper writes the
plain sum. No ratio or clip (REINFORCE); TIS against the engine's log-probs.
"""
import torch

from alignflow.algorithms.core import ADVANTAGES, Algorithm, RolloutBatch, group_stats, per_token, register_algorithm


@ADVANTAGES.register("asym_shift")
def asym_shift_advantage(batch: RolloutBatch, hp: dict) -> torch.Tensor:
    """A_i = R_i - (mean(R_group) - delta). -> [B, T]"""
    mean, _ = group_stats(batch.rewards, batch.group_ids)
    return per_token(batch.rewards - (mean - hp["delta"]), batch)


ASYMRE = register_algorithm(Algorithm(
    name="asymre", summary="REINFORCE with the group baseline shifted down by delta: A = R - (mean R - delta)",
    advantage="asym_shift", policy_loss="reinforce", loss_agg="seq_mean_token_mean",
    needs=("verifier",), paper="arXiv:2506.20520",
    defaults={"delta": 0.1, "tis_cap": 2.0}))
