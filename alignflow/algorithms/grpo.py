"""GRPO (DeepSeekMath, arXiv:2402.03300): group-standardised outcome reward, PPO-clip, per-sequence mean."""
import torch

from alignflow.algorithms.core import (ADVANTAGES, Algorithm, RolloutBatch, group_stats, per_token, register_algorithm,
                                       standardise)


@ADVANTAGES.register("group_std")
def group_std_advantage(batch: RolloutBatch, hp: dict) -> torch.Tensor:
    """A_i = (R_i - mean(R_group)) / (std(R_group) + eps), the same for every token. -> [B, T]"""
    mean, std = group_stats(batch.rewards, batch.group_ids)
    return per_token(standardise(batch.rewards, mean, std, hp["adv_eps"]), batch)


GRPO = register_algorithm(Algorithm(
    name="grpo", summary="group-relative advantage (R - mean)/std, PPO-clip, per-sequence token mean",
    advantage="group_std", policy_loss="clipped_ratio", loss_agg="seq_mean_token_mean",
    needs=("verifier",), paper="arXiv:2402.03300",
    defaults={"clip_eps": 0.2, "beta": 0.0, "adv_eps": 1e-4, "tis_cap": 2.0}))
