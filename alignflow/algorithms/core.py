"""The pieces every on-policy method is made of, registered by name with one fixed signature each.

    advantage(batch, hp)              -> [B, T] per-token advantages (no grad)
    policy_loss(logp, batch, adv, hp) -> ([B, T] per-token loss, metrics)
    loss_agg(token_loss, mask, hp)    -> scalar

An `Algorithm` is a named preset of the three plus the extra inputs it needs (reference, base, teacher
log-probs, ...), so the loop computes only those. No caller chooses a method with `if name == ...`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

import torch

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind, self._items = kind, {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj
        return deco

    def __getitem__(self, name: str) -> T:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {sorted(self._items)}")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(sorted(self._items))

    def items(self):
        return sorted(self._items.items())


@dataclass
class RolloutBatch:
    """One step's rollouts. B = prompts x group size, L = prompt + completion length, T = completion length."""
    input_ids: torch.Tensor            # [B, L] left-padded prompt, then completion (right-padded)
    attention_mask: torch.Tensor       # [B, L]
    completion_mask: torch.Tensor      # [B, T] 1 on generated tokens (up to and including EOS)
    rewards: torch.Tensor              # [B]
    group_ids: torch.Tensor            # [B] index of the prompt each response answers
    old_logprobs: torch.Tensor         # [B, T] trainer's log-probs under the policy that sampled
    rollout_logprobs: torch.Tensor     # [B, T] engine's log-probs of the sampled distribution
    ref_logprobs: torch.Tensor | None = None   # [B, T] frozen reference (for a KL term)
    extras: dict = field(default_factory=dict)

    @property
    def completion_len(self) -> int:
        return self.completion_mask.shape[1]


ADVANTAGES: Registry[Callable] = Registry("advantage")
POLICY_LOSSES: Registry[Callable] = Registry("policy_loss")
LOSS_AGGS: Registry[Callable] = Registry("loss_agg")


@dataclass(frozen=True)
class Algorithm:
    name: str
    summary: str
    advantage: str
    policy_loss: str
    loss_agg: str
    needs: tuple[str, ...] = ()        # extra inputs: "ref", "base", "teacher", "privileged", "verifier"
    defaults: dict = field(default_factory=dict)
    paper: str = ""

    def hparams(self, overrides: dict) -> dict:
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise ValueError(f"unknown hparams {sorted(unknown)} for algorithm {self.name!r}; "
                             f"allowed: {sorted(self.defaults)}")
        return {**self.defaults, **overrides}


ALGORITHMS: Registry[Algorithm] = Registry("algorithm")


def register_algorithm(algo: Algorithm) -> Algorithm:
    for registry, name in ((ADVANTAGES, algo.advantage), (POLICY_LOSSES, algo.policy_loss), (LOSS_AGGS, algo.loss_agg)):
        registry[name]  # fail at import time on a preset naming an unregistered piece
    return ALGORITHMS.register(algo.name)(algo)


# ---------------------------------------------------------------- shared pieces
def group_stats(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element mean and (unbiased) std of its group. values, group_ids: [B]."""
    n_groups = int(group_ids.max()) + 1
    count = torch.zeros(n_groups).index_add_(0, group_ids, torch.ones_like(values))
    mean = torch.zeros(n_groups).index_add_(0, group_ids, values) / count
    sq = torch.zeros(n_groups).index_add_(0, group_ids, (values - mean[group_ids]) ** 2)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    return mean[group_ids], std[group_ids]


@LOSS_AGGS.register("seq_mean_token_mean")
def seq_mean_token_mean(token_loss: torch.Tensor, mask: torch.Tensor, hp: dict) -> torch.Tensor:
    """GRPO: mean over each response's tokens, then over responses."""
    per_seq = (token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq.mean()


@LOSS_AGGS.register("token_mean")
def token_mean(token_loss: torch.Tensor, mask: torch.Tensor, hp: dict) -> torch.Tensor:
    """DAPO/DCPO: mean over all response tokens of the batch."""
    return (token_loss * mask).sum() / mask.sum().clamp(min=1)


@LOSS_AGGS.register("token_sum_norm")
def token_sum_norm(token_loss: torch.Tensor, mask: torch.Tensor, hp: dict) -> torch.Tensor:
    """Dr. GRPO: sum over tokens divided by a constant (max completion length x batch size)."""
    return (token_loss * mask).sum() / (mask.shape[0] * mask.shape[1])


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref): ref/pi - log(ref/pi) - 1 (>= 0)."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


@POLICY_LOSSES.register("clipped_ratio")
def clipped_ratio(logp: torch.Tensor, batch: RolloutBatch, adv: torch.Tensor, hp: dict):
    """PPO-clip surrogate with (optionally asymmetric) bounds, an optional k3 KL to the reference, and
    truncated importance sampling (cap C) against the rollout engine's log-probs."""
    ratio = torch.exp(logp - batch.old_logprobs)
    clipped = ratio.clamp(1 - hp["clip_eps"], 1 + hp.get("clip_eps_high", hp["clip_eps"]))
    loss = -torch.minimum(ratio * adv, clipped * adv)
    tis = torch.exp(batch.old_logprobs - batch.rollout_logprobs).clamp(max=hp.get("tis_cap", 2.0)).detach()
    loss = loss * tis
    metrics = {"clip_frac": ((ratio - clipped).abs() > 0).float().mean().item()}
    if hp.get("beta", 0.0) > 0:
        kl = k3_kl(logp, batch.ref_logprobs)
        loss = loss + hp["beta"] * kl
        metrics["kl"] = kl.mean().item()
    return loss, metrics
