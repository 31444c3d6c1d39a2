"""OPMD, online policy mirror descent in the paper's form ("Group-Relative REINFORCE Is Secretly an Off-Policy
Algorithm: Demystifying Some Myths About GRPO and Its Friends", arXiv:2509.24203):

    L = -(1/G) sum_i (R_i - mean R) s_i + (tau / 2G) sum_i (s_i - s_i^old)^2
    s_i = (1/|y_i|) sum_t log pi_theta(y_i,t)      (sequence log-prob, length-normalised so long answers
                                                      do not dominate)

Per token: -A_i log pi_theta(y_t) + (tau/2)(s_i - s_i^old)^2; `seq_mean_token_mean` turns the first into
-A_i s_i and keeps the second, then averages over the batch's responses (= over groups of (1/G) sums).
tau = 1.0 (Trinity-RFT's default). The quadratic term's gradient tau (s - s_old) grad s is zero on the first
optimizer step on a batch: it acts from the second (mini_batches > 1 or ppo_epochs > 1), or on off-policy data.

Departure: this is the paper's form, not Trinity-RFT's code (-A log pi / (1 + tau), token mean). TIS against the
engine's log-probs multiplies the linear term, as for every loss here.
"""
import torch

from alignflow.algorithms import dr_grpo  # noqa: F401  (registers group_mean)
from alignflow.algorithms.core import POLICY_LOSSES, Algorithm, RolloutBatch, register_algorithm, tis_weight


def mean_seq_logprob(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """s_i = (1/|y_i|) sum_t logp_i,t. [B, T] -> [B]"""
    return (logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)


@POLICY_LOSSES.register("opmd")
def opmd_loss(logp: torch.Tensor, batch: RolloutBatch, adv: torch.Tensor, hp: dict):
    mask = batch.completion_mask.float()
    drift = mean_seq_logprob(logp, mask) - mean_seq_logprob(batch.old_logprobs, mask)      # [B]
    token_loss = -adv * logp * tis_weight(batch, hp) + hp["tau"] / 2 * drift[:, None] ** 2
    # |d(proximal term)/d s_i| = tau |s_i - s_old_i|: 0 means the proximal term had no gradient this step
    return token_loss, {"opmd/drift_sq": (drift ** 2).mean().item(),
                        "opmd/prox_grad": (hp["tau"] * drift.abs()).mean().item()}


OPMD = register_algorithm(Algorithm(
    name="opmd", summary="online policy mirror descent: -A s + (tau/2)(s - s_old)^2 on length-normalised "
                         "sequence log-probs, A = R - mean R",
    advantage="group_mean", policy_loss="opmd", loss_agg="seq_mean_token_mean",
    needs=("verifier",), paper="arXiv:2509.24203",
    mini_batches=4,  # ours: the proximal term only has a gradient from a batch's second optimizer step on
    defaults={"tau": 1.0, "tis_cap": 2.0}))
