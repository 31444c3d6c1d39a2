"""EMPG, entropy-modulated policy gradients ("Harnessing Uncertainty: Entropy-Modulated Policy Gradients for
Long-Horizon LLM Agents", arXiv:2509.09265). A step is one reasoning line (';' or newline separated, need "steps");
its entropy H is the mean token entropy of the policy that sampled it (need "entropy"), min-max normalised to
[0, 1] over all steps of the batch. The outcome advantage A (GRPO's) is modulated per step t:

    A_t = g(H_t) A + zeta f(H_{t+1})
    g(H) = exp(-k H) / mean_batch exp(-k H)        (self-calibrating: mean g = 1 over the batch's steps)
    f(H) = exp(-k' H)                               (future-clarity bonus: reward steps that lead somewhere clear)

k = k' = 1; zeta = 0.05 (a reproduction's value; the authors' code uses 0.1): a parameter.
Departures: the last step of a response has no H_{t+1}, so no bonus there (our choice). The authors' final
batch re-normalisation of the modulated advantages is not applied (unconfirmed). PPO-clip, per-sequence mean.
"""
import torch

from alignflow.algorithms import grpo  # noqa: F401  (registers group_std)
from alignflow.algorithms.core import ADVANTAGES, Algorithm, RolloutBatch, register_algorithm
from alignflow.algorithms.grpo import group_std_advantage


def step_entropy(entropy: torch.Tensor, step_ids: torch.Tensor, mask: torch.Tensor):
    """Mean token entropy of each (response, step). -> (H [B, S], valid [B, S] bool), S = most steps in a response"""
    S = int((step_ids * mask).max()) + 1
    ids = step_ids.clamp(max=S - 1).long()
    total = torch.zeros(entropy.shape[0], S, device=entropy.device).scatter_add_(1, ids, entropy * mask)
    count = torch.zeros(entropy.shape[0], S, device=entropy.device).scatter_add_(1, ids, mask.float())
    return total / count.clamp(min=1), count > 0


def modulated_step_advantage(adv: torch.Tensor, H: torch.Tensor, valid: torch.Tensor, hp: dict) -> torch.Tensor:
    """A [B] outcome advantage, H [B, S] step entropies -> [B, S] g(H_t) A + zeta f(H_{t+1})."""
    h = H[valid]
    H_norm = torch.where(valid, (H - h.min()) / (h.max() - h.min()).clamp(min=1e-8), 0.0)   # [B, S] in [0, 1]
    scale = torch.exp(-hp["k"] * H_norm)
    g = scale / scale[valid].mean()
    bonus = torch.zeros_like(H)
    bonus[:, :-1] = hp["zeta"] * torch.exp(-hp["k_future"] * H_norm[:, 1:]) * valid[:, 1:]   # none on the last step
    return (g * adv[:, None] + bonus) * valid


@ADVANTAGES.register("entropy_modulated")
def empg_advantage(batch: RolloutBatch, hp: dict) -> torch.Tensor:
    mask = batch.completion_mask.float()
    outcome = group_std_advantage(batch, hp)[:, 0]                                      # [B]
    H, valid = step_entropy(batch.entropy, batch.step_ids, mask)
    per_step = modulated_step_advantage(outcome, H, valid, hp)                          # [B, S]
    return per_step.gather(1, batch.step_ids.clamp(max=H.shape[1] - 1).long()) * mask


EMPG = register_algorithm(Algorithm(
    name="empg", summary="outcome advantage scaled per reasoning step by self-normalised exp(-H), "
                         "plus a future-clarity bonus zeta exp(-H_next)",
    advantage="entropy_modulated", policy_loss="clipped_ratio", loss_agg="seq_mean_token_mean",
    needs=("verifier", "entropy", "steps"), paper="arXiv:2509.09265",
    defaults={"k": 1.0, "k_future": 1.0, "zeta": 0.05, "clip_eps": 0.2, "beta": 0.0, "adv_eps": 1e-4,
              "tis_cap": 2.0}))
