"""Dr. GRPO ("Understanding R1-Zero-Like Training: A Critical Perspective", arXiv:2503.20783).

GRPO with its two biases removed:
    A_i = R_i - mean(R_group)                      (no division by std: no question-difficulty bias)
    L   = -(1 / (B * T)) sum_i sum_t min(rho A_i, clip(rho, 1-eps, 1+eps) A_i)   (no 1/|y_i|: no length bias)

Departure: the paper's constant is the generation budget (MAX_TOKENS); `token_sum_norm` divides by the batch's
longest completion T instead. That is still one constant for every response of a step (so the length bias stays
removed); only its value varies from step to step.
"""
import torch

from alignflow.algorithms.core import ADVANTAGES, Algorithm, RolloutBatch, group_stats, per_token, register_algorithm


@ADVANTAGES.register("group_mean")
def group_mean_advantage(batch: RolloutBatch, hp: dict) -> torch.Tensor:
    """A_i = R_i - mean(R_group), the same for every token. -> [B, T]"""
    mean, _ = group_stats(batch.rewards, batch.group_ids)
    return per_token(batch.rewards - mean, batch)


DR_GRPO = register_algorithm(Algorithm(
    name="dr_grpo", summary="mean-only group advantage R - mean, PPO-clip, token sum / constant (no length bias)",
    advantage="group_mean", policy_loss="clipped_ratio", loss_agg="token_sum_norm",
    needs=("verifier",), paper="arXiv:2503.20783",
    defaults={"clip_eps": 0.2, "beta": 0.0, "tis_cap": 2.0}))
