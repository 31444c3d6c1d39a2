"""OPSD, on-policy self-distillation with privileged information ("Self-Distilled Reasoner: On-Policy
Self-Distillation for Large Language Models", arXiv:2601.18734; the RL-with-reverse-KL-penalty form is from
"Privileged Information Distillation for Language Models", arXiv:2602.04942). One model plays both parts:
the teacher is the policy with the worked solution placed in its prompt (privileged, hidden at test time; log-probs
with no grad), the student is the same policy without it, sampling on-policy. Per sampled token, with the
single-sample estimate of the reverse KL

    D_t = log pi_student(y_t) - log pi_teacher(y_t | solution in context)
    A_t = task_weight * A_i^GRPO - distill_coef * D_t

As published (2601.18734): task_weight = 0, distill_coef = 1 (minimise the per-token divergence on the
student's own samples, no reward). Hybrid (2602.04942's OPSD, "ours" in ALGORITHMS.md): task_weight = 1,
distill_coef = beta_KL (e.g. 0.1): the task reward plus a reverse-KL penalty.
Loss: PPO-clip surrogate on A_t, token mean.

Departures: only the sampled-token estimate of the reverse KL (no full-vocabulary KL / generalised JSD);
pi_student is the sampling policy's trainer log-prob (pi_old); the privileged prompt's wording is the loop's
(core.NEEDS "privileged"); token-mean aggregation is our choice.
"""
import torch

from alignflow.algorithms.core import ADVANTAGES, Algorithm, RolloutBatch, register_algorithm
from alignflow.algorithms.grpo import group_std_advantage


def reverse_kl_per_token(batch: RolloutBatch) -> torch.Tensor:
    """D_t = log pi_student(y_t) - log pi_teacher(y_t) on sampled tokens. -> [B, T]"""
    return (batch.old_logprobs - batch.privileged_logprobs) * batch.completion_mask


@ADVANTAGES.register("self_distill")
def self_distill_advantage(batch: RolloutBatch, hp: dict) -> torch.Tensor:
    adv = -hp["distill_coef"] * reverse_kl_per_token(batch)
    if hp["task_weight"]:
        adv = adv + hp["task_weight"] * group_std_advantage(batch, hp)
    return adv


OPSD = register_algorithm(Algorithm(
    name="opsd", summary="self-distillation: teacher = the policy with the worked solution in context; "
                         "per-token reverse KL on own samples (+ task reward in the hybrid)",
    advantage="self_distill", policy_loss="clipped_ratio", loss_agg="token_mean",
    needs=("verifier", "privileged"), paper="arXiv:2601.18734 (hybrid: arXiv:2602.04942)",
    defaults={"distill_coef": 1.0, "task_weight": 0.0, "clip_eps": 0.2, "beta": 0.0, "adv_eps": 1e-4,
              "tis_cap": 2.0}))
