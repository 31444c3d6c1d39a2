"""G-OPD and ExOPD ("Learning beyond Teacher: Generalized On-Policy Distillation with Reward Extrapolation",
arXiv:2602.12125). The student samples; the teacher scores every sampled token; per-token advantage (no grad)

    A_t = lam * log pi_T(y_t) + (1 - lam) * log pi_ref(y_t) - log pi_theta(y_t)

i.e. a dense reward lam * log(pi_T / pi_ref) under a KL(pi_theta || pi_ref) constraint. lam = 1 is standard
on-policy distillation (per-token reverse KL to the teacher, `opd`); lam > 1 is reward extrapolation (`exopd`,
lam = 1.25, the paper's default). pi_ref is whatever the stage passes as "ref": the student's starting (SFT) model
by default, the teacher's pre-RL model for "reward correction". Loss: -A_t rho_t, PPO-clipped when a batch is
reused (several optimizer steps per rollout: mini_batches, ppo_epochs); token mean.

Departures: log pi_theta is the trainer's log-prob of the policy that sampled (pi_old), computed once per step;
the token-mean aggregation and the clip (0.2) are ours (the paper's loss form follows its RL framework's defaults).
"""
import torch

from alignflow.algorithms.core import ADVANTAGES, Algorithm, RolloutBatch, register_algorithm


@ADVANTAGES.register("gopd")
def gopd_advantage(batch: RolloutBatch, hp: dict) -> torch.Tensor:
    """A_t = lam log pi_T + (1 - lam) log pi_ref - log pi_old, on sampled tokens (0 on padding). -> [B, T]"""
    lam = hp["reward_scale"]
    adv = lam * batch.teacher_logprobs + (1 - lam) * batch.ref_logprobs - batch.old_logprobs
    return adv * batch.completion_mask


_COMMON = dict(advantage="gopd", policy_loss="clipped_ratio", loss_agg="token_mean", needs=("teacher", "ref"),
               paper="arXiv:2602.12125",
               mini_batches=4)  # verl's default 4 updates per rollout (the paper's code base); unconfirmed
OPD = register_algorithm(Algorithm(
    name="opd", summary="on-policy distillation: per-token advantage log pi_T - log pi_theta (G-OPD, lam = 1)",
    defaults={"reward_scale": 1.0, "clip_eps": 0.2, "beta": 0.0, "tis_cap": 2.0}, **_COMMON))
EXOPD = register_algorithm(Algorithm(
    name="exopd", summary="G-OPD with reward extrapolation: lam log pi_T + (1-lam) log pi_ref - log pi_theta, lam 1.25",
    defaults={"reward_scale": 1.25, "clip_eps": 0.2, "beta": 0.0, "tis_cap": 2.0}, **_COMMON))
