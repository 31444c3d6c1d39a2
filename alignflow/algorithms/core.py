"""The pieces every on-policy method is made of, registered by name with one fixed signature each.

    advantage(batch, hp)              -> [B, T] per-token advantages (no grad)
    policy_loss(logp, batch, adv, hp) -> ([B, T] per-token loss, metrics)
    loss_agg(token_loss, mask, hp, counts=None) -> scalar   (counts: BatchCounts of the batch, global under DDP)
    rollout(source, hp)               -> (RolloutBatch, metrics)   how a step's rollouts are produced

An `Algorithm` is a named preset of these plus the extra inputs it `needs` (see NEEDS), so the loop computes
only those. No caller chooses a method with `if name == ...`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generic, Protocol, TypeVar

import torch
import torch.nn.functional as F

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


# What a method may ask the loop for, and the RolloutBatch field(s) each fills.
NEEDS = {
    "verifier": "rewards from the task's reward function (always computed: it is also the run's metric)",
    "ref": "ref_logprobs: a frozen reference, usually the SFT model (also implied by hparam beta > 0)",
    "base": "base_logprobs: the pre-SFT base model",
    "teacher": "teacher_logprobs: a teacher model sharing the tokenizer",
    "solutions": "the prompts' worked (oracle) solutions, readable by rollout hooks via source.solution(i)",
    "privileged": "privileged_logprobs: the policy itself (no grad) with its prompt's worked solution in context "
                  "(PRIVILEGED_TEMPLATE); implies solutions",
    "expert": "expert demonstration rows appended to the batch (is_expert), share = hparam expert_share",
    "entropy": "entropy: the policy's per-token entropy at sampling time",
    "steps": "step_ids: index of the reasoning step (';' or newline separated) each completion token is in",
    "history": "times_seen, history_mean, history_std: per-prompt reward statistics across steps",
}


PRIVILEGED_TEMPLATE = "{prompt} worked solution: {solution}"   # lowercase: the tiny tokenizer's alphabet


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
    ref_logprobs: torch.Tensor | None = None          # [B, T] "ref": frozen reference (KL term, G-OPD, SRPPO target)
    base_logprobs: torch.Tensor | None = None         # [B, T] "base": pre-SFT model (SRPPO baseline)
    teacher_logprobs: torch.Tensor | None = None      # [B, T] "teacher"
    privileged_logprobs: torch.Tensor | None = None   # [B, T] "privileged": policy with the solution in context
    entropy: torch.Tensor | None = None               # [B, T] "entropy": H(pi_old(. | x, y_<t))
    step_ids: torch.Tensor | None = None              # [B, T] "steps": reasoning-step index of each token
    times_seen: torch.Tensor | None = None            # [B] "history": i-th time this prompt is trained on (>= 1)
    history_mean: torch.Tensor | None = None          # [B] "history": mean of all its rewards so far (incl. now)
    history_std: torch.Tensor | None = None           # [B] "history": their unbiased std
    is_expert: torch.Tensor | None = None             # [B] bool "expert": demonstration rows, not sampled
    prompts: list[str] = field(default_factory=list)  # [n_groups] the (unguided) prompt of each group
    step: int = 0                                     # training step (0-based) and run length, for schedules
    total_steps: int = 1
    extras: dict = field(default_factory=dict)

    @property
    def completion_len(self) -> int:
        return self.completion_mask.shape[1]

    @property
    def n_groups(self) -> int:
        return int(self.group_ids.max()) + 1 if len(self.group_ids) else 0


class RolloutSource(Protocol):
    """What a rollout hook may do: draw prompts from the run's seeded stream and roll them out."""
    prompts_per_step: int
    pad_id: int

    def draw(self, n: int) -> list[int]: ...            # dataset indices

    def prompt(self, index: int) -> str: ...

    def solution(self, index: int) -> str | None: ...   # the worked solution (privileged info), if given

    def rollout(self, indices: list[int], contexts: list[str] | None = None) -> RolloutBatch:
        """Sample a group per index. `contexts` replaces what the policy is shown (e.g. a guided prompt);
        rewards are still computed against the original prompt and answer."""


ADVANTAGES: Registry[Callable] = Registry("advantage")
POLICY_LOSSES: Registry[Callable] = Registry("policy_loss")
LOSS_AGGS: Registry[Callable] = Registry("loss_agg")
ROLLOUTS: Registry[Callable] = Registry("rollout")


@dataclass(frozen=True)
class Algorithm:
    name: str
    summary: str
    advantage: str
    policy_loss: str
    loss_agg: str
    needs: tuple[str, ...] = ()        # keys of NEEDS
    defaults: dict = field(default_factory=dict)
    paper: str = ""
    rollout: str = "plain"             # a ROLLOUTS name: how a step's rollouts are produced
    mini_batches: int = 1              # optimizer steps per pass over a rollout batch, as the paper runs it
                                       # (rl.mini_batches overrides); > 1 makes the ratio leave 1 and the clip bind

    def hparams(self, overrides: dict) -> dict:
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise ValueError(f"unknown hparams {sorted(unknown)} for algorithm {self.name!r}; "
                             f"allowed: {sorted(self.defaults)}")
        return {**self.defaults, **overrides}

    def inputs(self, overrides: dict | None = None) -> frozenset[str]:
        """The extra inputs a run with these hparams needs: `needs`, plus "ref" when a KL term is on."""
        hp = self.hparams(overrides or {})
        return frozenset(self.needs) | ({"ref"} if hp.get("beta", 0.0) > 0 else set())


ALGORITHMS: Registry[Algorithm] = Registry("algorithm")


def register_algorithm(algo: Algorithm) -> Algorithm:
    for registry, name in ((ADVANTAGES, algo.advantage), (POLICY_LOSSES, algo.policy_loss), (LOSS_AGGS, algo.loss_agg),
                           (ROLLOUTS, algo.rollout)):
        registry[name]  # fail at import time on a preset naming an unregistered piece
    unknown = set(algo.needs) - set(NEEDS)
    if unknown:
        raise KeyError(f"algorithm {algo.name!r} needs unknown inputs {sorted(unknown)}; known: {sorted(NEEDS)}")
    return ALGORITHMS.register(algo.name)(algo)


# ---------------------------------------------------------------- shared pieces
def group_stats(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element mean and (unbiased) std of its group. values, group_ids: [B]."""
    n_groups, group_ids = int(group_ids.max()) + 1, group_ids.to(values.device)
    zeros = lambda: torch.zeros(n_groups, dtype=values.dtype, device=values.device)  # noqa: E731
    count = zeros().index_add_(0, group_ids, torch.ones_like(values))
    mean = zeros().index_add_(0, group_ids, values) / count
    sq = zeros().index_add_(0, group_ids, (values - mean[group_ids]) ** 2)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    return mean[group_ids], std[group_ids]


def standardise(values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float) -> torch.Tensor:
    """(v - mean) / (std + eps), and 0 where std = 0 (a group of identical rewards carries no signal)."""
    return torch.where(std > 0, (values - mean) / (std + eps), torch.zeros_like(values))


def per_token(values: torch.Tensor, batch: RolloutBatch) -> torch.Tensor:
    """[B] -> [B, T]: the same value on every token of a response (on the completions' device; rewards and
    group ids stay on the CPU)."""
    return values.to(batch.completion_mask.device)[:, None].expand(-1, batch.completion_len)


@dataclass(frozen=True)
class BatchCounts:
    """What the aggregations divide by: counts of the batch the loss is over. Under DDP that batch is the union
    of every rank's (mini-)batch, so the counts are all-reduced (alignflow/train/update.py) and every rank divides
    its partial sums by the same global numbers, as one process holding all the rows would."""
    rows: float            # responses
    tokens: float          # generated tokens (completion-mask ones)
    width: int             # longest completion T (the ranks' maximum)
    expert_tokens: float = 0.0   # generated tokens of expert rows (CHORD)

    @staticmethod
    def of(mask: torch.Tensor, is_expert: torch.Tensor | None = None) -> "BatchCounts":
        """The counts of one process's [B, T] completion mask."""
        expert = float((mask * is_expert[:, None].to(mask.device)).sum()) if is_expert is not None else 0.0
        return BatchCounts(rows=mask.shape[0], tokens=float(mask.sum()), width=mask.shape[1], expert_tokens=expert)


@LOSS_AGGS.register("seq_mean_token_mean")
def seq_mean_token_mean(token_loss: torch.Tensor, mask: torch.Tensor, hp: dict,
                        counts: BatchCounts | None = None) -> torch.Tensor:
    """GRPO: mean over each response's tokens, then over the batch's responses (counts.rows)."""
    per_seq = (token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq.sum() / (counts or BatchCounts.of(mask)).rows


@LOSS_AGGS.register("token_mean")
def token_mean(token_loss: torch.Tensor, mask: torch.Tensor, hp: dict,
               counts: BatchCounts | None = None) -> torch.Tensor:
    """DAPO/DCPO: mean over all response tokens of the batch (counts.tokens)."""
    return (token_loss * mask).sum() / max((counts or BatchCounts.of(mask)).tokens, 1.0)


@LOSS_AGGS.register("token_sum_norm")
def token_sum_norm(token_loss: torch.Tensor, mask: torch.Tensor, hp: dict,
                   counts: BatchCounts | None = None) -> torch.Tensor:
    """Dr. GRPO: sum over tokens divided by a constant (longest completion x batch size)."""
    counts = counts or BatchCounts.of(mask)
    return (token_loss * mask).sum() / (counts.rows * counts.width)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of [B, T] values over the mask's generated tokens (a metric: padding never dilutes it)."""
    mask = mask.to(values.dtype)
    return float((values * mask).sum() / mask.sum().clamp(min=1))


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref): ref/pi - log(ref/pi) - 1 (>= 0)."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def tis_weight(batch: RolloutBatch, hp: dict) -> torch.Tensor:
    """Truncated importance sampling against the engine/trainer mismatch: min(pi_old / pi_rollout, C). [B, T]"""
    return torch.exp(batch.old_logprobs - batch.rollout_logprobs).clamp(max=hp.get("tis_cap", 2.0)).detach()


def clip_surrogate(ratio: torch.Tensor, adv: torch.Tensor, lower, upper) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's pessimistic surrogate as a loss, -min(r A, clip(r, lower, upper) A); bounds may be per token.
    Returns (loss, clipped mask)."""
    clipped = torch.clamp(ratio, lower, upper)
    return -torch.minimum(ratio * adv, clipped * adv), (ratio - clipped).abs() > 0


def add_kl_penalty(loss: torch.Tensor, logp: torch.Tensor, batch: RolloutBatch, hp: dict, metrics: dict):
    """loss + beta * k3 KL(pi || ref) when beta > 0 (the loop then provides ref_logprobs)."""
    if hp.get("beta", 0.0) > 0:
        kl = k3_kl(logp, batch.ref_logprobs)
        metrics["kl"] = masked_mean(kl.detach(), batch.completion_mask)  # over generated tokens, not the padding
        return loss + hp["beta"] * kl
    return loss


@POLICY_LOSSES.register("clipped_ratio")
def clipped_ratio(logp: torch.Tensor, batch: RolloutBatch, adv: torch.Tensor, hp: dict):
    """PPO-clip surrogate with (optionally asymmetric) bounds, an optional k3 KL to the reference, and
    truncated importance sampling (cap C) against the rollout engine's log-probs."""
    ratio = torch.exp(logp - batch.old_logprobs)
    loss, clipped = clip_surrogate(ratio, adv, 1 - hp["clip_eps"], 1 + hp.get("clip_eps_high", hp["clip_eps"]))
    metrics = {"clip_frac": masked_mean(clipped.float(), batch.completion_mask)}  # not over the padding
    return add_kl_penalty(loss * tis_weight(batch, hp), logp, batch, hp, metrics), metrics


@POLICY_LOSSES.register("reinforce")
def reinforce(logp: torch.Tensor, batch: RolloutBatch, adv: torch.Tensor, hp: dict):
    """Plain REINFORCE, -A log pi_theta(y_t), no ratio and no clip (REC/AsymRE family), with TIS."""
    return -adv * logp * tis_weight(batch, hp), {}


@ROLLOUTS.register("plain")
def plain_rollout(source: RolloutSource, hp: dict) -> tuple[RolloutBatch, dict]:
    """One group for each of `prompts_per_step` freshly drawn prompts."""
    return source.rollout(source.draw(source.prompts_per_step)), {}


# ---------------------------------------------------------------- batch surgery for rollout hooks
_PER_ROW_INPUTS = ("ref_logprobs", "base_logprobs", "teacher_logprobs", "privileged_logprobs", "entropy", "step_ids",
                   "times_seen", "history_mean", "history_std")


def select_groups(batch: RolloutBatch, keep: list[int]) -> RolloutBatch:
    """The rows of the listed groups, renumbered 0..len(keep)-1 in that order (before extra inputs are filled)."""
    assert all(getattr(batch, f) is None for f in _PER_ROW_INPUTS), "select groups before filling extra inputs"
    rows = [torch.nonzero(batch.group_ids == g).flatten() for g in keep]
    rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
    renumber = {g: i for i, g in enumerate(keep)}
    pick = lambda t: None if t is None else t[rows]  # noqa: E731
    return RolloutBatch(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows],
                        completion_mask=batch.completion_mask[rows], rewards=batch.rewards[rows],
                        group_ids=torch.tensor([renumber[int(g)] for g in batch.group_ids[rows]], dtype=torch.long),
                        old_logprobs=batch.old_logprobs[rows], rollout_logprobs=batch.rollout_logprobs[rows],
                        is_expert=pick(batch.is_expert), extras=dict(batch.extras),
                        prompts=[batch.prompts[g] for g in keep] if batch.prompts else [])


def concat_batches(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """Stack batches of different prompt (P) and completion (T) lengths: prompts re-padded on the left,
    completions on the right; group ids offset so groups stay distinct."""
    assert all(getattr(b, f) is None for b in batches for f in _PER_ROW_INPUTS), "concat before filling extra inputs"
    P = max(b.input_ids.shape[1] - b.completion_len for b in batches)
    T = max(b.completion_len for b in batches)
    ids, attn, cmask, old, roll, groups, expert, offset = [], [], [], [], [], [], [], 0
    for b in batches:
        left, right = P - (b.input_ids.shape[1] - b.completion_len), T - b.completion_len
        ids.append(F.pad(b.input_ids, (left, right), value=pad_id))
        attn.append(F.pad(b.attention_mask, (left, right), value=0))
        cmask.append(F.pad(b.completion_mask, (0, right), value=0))
        old.append(F.pad(b.old_logprobs, (0, right), value=0.0))
        roll.append(F.pad(b.rollout_logprobs, (0, right), value=0.0))
        groups.append(b.group_ids + offset)
        offset += b.n_groups
        expert.append(b.is_expert if b.is_expert is not None else
                      torch.zeros(len(b.rewards), dtype=torch.bool, device=b.completion_mask.device))
    return RolloutBatch(input_ids=torch.cat(ids), attention_mask=torch.cat(attn), completion_mask=torch.cat(cmask),
                        rewards=torch.cat([b.rewards for b in batches]), group_ids=torch.cat(groups),
                        old_logprobs=torch.cat(old), rollout_logprobs=torch.cat(roll),
                        is_expert=torch.cat(expert) if any(b.is_expert is not None for b in batches) else None,
                        prompts=[p for b in batches for p in b.prompts])


# ---------------------------------------------------------------- per-prompt history ("history")
class RewardHistory:
    """Reward statistics of every prompt over all the steps it was trained on (DCPO's SAS needs them).
    Part of the loop's resumable state: `state_dict` holds only tensors and strings."""

    def __init__(self):
        self._stats: dict[str, list[float]] = {}   # prompt -> [times seen, n rewards, sum, sum of squares]

    def update(self, prompts: list[str], rewards: torch.Tensor, group_ids: torch.Tensor):
        """Add this step's rewards; -> (times_seen, mean, unbiased std) per row [B], including this step."""
        r = rewards.double()
        for g, prompt in enumerate(prompts):
            mine = r[group_ids == g]
            s = self._stats.setdefault(prompt, [0.0, 0.0, 0.0, 0.0])
            s[0] += 1
            s[1] += len(mine)
            s[2] += float(mine.sum())
            s[3] += float((mine ** 2).sum())
        stats = torch.tensor([self._stats[prompts[int(g)]] for g in group_ids], dtype=torch.float64)  # [B, 4]
        times, n, total, sq = stats.unbind(-1)
        mean = total / n
        var = ((sq - n * mean ** 2) / (n - 1).clamp(min=1)).clamp(min=0)
        return times.float(), mean.float(), var.sqrt().float()

    def state_dict(self) -> dict:
        return {"prompts": list(self._stats), "stats": torch.tensor(list(self._stats.values()), dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        self._stats = {p: row.tolist() for p, row in zip(state["prompts"], state["stats"])}
