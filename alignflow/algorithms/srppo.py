"""Self-Rewarding PPO ("Self-Rewarding PPO: Aligning Large Language Models with Demonstrations Only",
arXiv:2510.21090). No labels: the reward is implicit in two frozen models,

    r(x, y) = sum_t [ log pi_SFT(y_t | x, y_<t) - log pi_base(y_t | x, y_<t) ]      (SFT = target, base = baseline)
    (divided by |y| when length_normalise = 1)

optimised with PPO-clip and a KL penalty beta * KL(pi || pi_SFT) (k3 estimator, per token).

Departures: the paper runs PPO with a value model (GAE) on this reward given at EOS; we use a group baseline
instead, A_i = (r_i - mean_group r) / (std_group r + eps) (GRPO-style, no critic). Length normalisation is off by
default (the paper's reward is the sequence log-ratio); beta = 0.04 is our choice (DeepSeekMath's GRPO value),
the paper's coefficient is not confirmed. The verifier's reward is still computed by the loop, as a metric only,
unless verifier_weight > 0 (not in the paper: a variant with labels, for comparison): then the advantage adds
verifier_weight x the group-standardised verifier reward to the group-standardised implicit reward (each
standardised on its own, so neither scale drowns the other). verifier_weight = 0 is the paper's demonstrations-only
method.
"""
import torch

from alignflow.algorithms.core import (ADVANTAGES, Algorithm, RolloutBatch, group_stats, per_token, register_algorithm,
                                       standardise)


def implicit_reward(batch: RolloutBatch, hp: dict) -> torch.Tensor:
    """r_i = sum_t (log pi_SFT - log pi_base) over response i's tokens (/ |y_i| if length_normalise). -> [B]"""
    mask = batch.completion_mask.float()
    reward = ((batch.ref_logprobs - batch.base_logprobs) * mask).sum(-1)
    if hp["length_normalise"]:
        reward = reward / mask.sum(-1).clamp(min=1)
    return reward


@ADVANTAGES.register("implicit_reward_group")
def implicit_reward_advantage(batch: RolloutBatch, hp: dict) -> torch.Tensor:
    """Group-standardised implicit reward (+ verifier_weight x the group-standardised verifier reward), the same for
    every token. -> [B, T]"""
    reward = implicit_reward(batch, hp)
    mean, std = group_stats(reward, batch.group_ids)
    adv = standardise(reward, mean, std, hp["adv_eps"])
    if hp.get("verifier_weight", 0.0):
        verifier = batch.rewards.to(reward.device, reward.dtype)
        v_mean, v_std = group_stats(verifier, batch.group_ids)
        adv = adv + hp["verifier_weight"] * standardise(verifier, v_mean, v_std, hp["adv_eps"])
    return per_token(adv, batch)


SRPPO = register_algorithm(Algorithm(
    name="srppo", summary="implicit reward log pi_SFT - log pi_base (no labels), group baseline, PPO-clip + KL to SFT",
    advantage="implicit_reward_group", policy_loss="clipped_ratio", loss_agg="seq_mean_token_mean",
    needs=("ref", "base"), paper="arXiv:2510.21090",
    mini_batches=4,  # PPO as verl runs it by default (train batch 1024 / mini-batch 256); the paper's unconfirmed
    defaults={"clip_eps": 0.2, "beta": 0.04, "adv_eps": 1e-4, "tis_cap": 2.0, "length_normalise": 0.0,
              "verifier_weight": 0.0}))
