"""The one on-policy loop: rollout -> reward -> extra inputs -> advantage -> update -> weight sync (verified).

Every method is a preset of registered pieces (alignflow/algorithms); this file never names one. A preset's
`rollout` hook decides how a step's rollouts are produced; its `needs` decide which extra inputs the loop
computes into the RolloutBatch (reference / base / teacher log-probs, privileged-context log-probs, entropies,
reasoning steps, per-prompt reward history, expert rows: see alignflow.algorithms.NEEDS).
Resumable: training state is checkpointed every `checkpoint_every` steps into `ckpt_dir` (outside DVC's
outs), and the candidate snapshots are kept there too until the stage copies them into its outs.
Under torchrun the ranks replicate the policy (DDP) or shard it (`rl.parallel.strategy: fsdp`, FSDP2): then each
rank's engine samples from its own full copy of the weights, gathered from the shards by every sync and verified
like any sync; the snapshots are gathered to rank 0 whole, and resume state is written in shards by every rank.
"""
from __future__ import annotations

import copy
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from alignflow import checkpoint, faults
from alignflow.train import distributed
from alignflow.train.update import (NonFiniteLossError, UpdateCounters, shared_history_update,  # noqa: F401
                                    update_policy)
from alignflow.algorithms import ADVANTAGES, ALGORITHMS, ROLLOUTS, RewardHistory, RolloutBatch
from alignflow.algorithms.core import PRIVILEGED_TEMPLATE, concat_batches
from alignflow.config import CandidateConfig, RLConfig
from alignflow.models import autocast, chat_prompt, save
from alignflow.data.rows import TaskRows
from alignflow.rewards import RewardResult, RewardSet, accuracy_reward
from alignflow.rollout import Sampling, make_engine
from alignflow.train.logprobs import policy_logprobs as token_logprobs   # lm_head in chunks of tokens (issue 18)


log = logging.getLogger(__name__)


@dataclass
class RunResult:
    snapshots: list[Path]
    resumed_from: int
    skipped_updates: int


@dataclass
class ExtraModels:
    """Frozen models a method may need, sharing the policy's tokenizer and device (alignflow.algorithms.NEEDS)."""
    ref: object | None = None       # "ref": the reference, usually the SFT model the policy starts from
    base: object | None = None      # "base": the pre-SFT base model
    teacher: object | None = None   # "teacher": e.g. a stronger RL candidate of an earlier run


def required_inputs(cand: CandidateConfig) -> frozenset[str]:
    """What the stage must provide for this candidate: a subset of NEEDS' keys ("ref", "base", "teacher",
    "solutions"/"privileged" -> solutions=..., "expert" -> expert=...); the rest the loop computes itself."""
    return ALGORITHMS[cand.algorithm].inputs(cand.hparams)


# ---------------------------------------------------------------- rollouts
def _rollout_batch(engine, tokenizer, rows: TaskRows, cfg: RLConfig, reward: RewardSet,
                   contexts: list[str] | None = None) -> tuple[RolloutBatch, RewardResult]:
    """A group per prompt. The policy is shown `contexts` when given (e.g. a guided prompt), else the row's chat;
    rewards always score the completion against the original prompt and the row's columns."""
    shown = contexts if contexts is not None else rows.messages
    completions = engine.generate([chat_prompt(tokenizer, p) for p in shown], cfg.group_size,
                                  Sampling(cfg.max_new_tokens, cfg.temperature))
    group = rows.repeat(cfg.group_size)
    result = reward(group.prompts, completions.texts, group.columns)
    batch = RolloutBatch(input_ids=completions.input_ids, attention_mask=completions.attention_mask,
                         completion_mask=completions.completion_mask, rewards=torch.tensor(result.total),
                         group_ids=completions.prompt_index, old_logprobs=completions.logprobs,
                         rollout_logprobs=completions.logprobs, prompts=list(rows.prompts))
    return batch, result


class _Scorer(torch.nn.Module):
    """The policy's token log-probs as a module's forward, so DDP (under torchrun) can hook the backward, and FSDP
    has a root whose forward gathers the weights (every forward of a sharded trainer goes through it:
    alignflow.rollout.token_logprobs). The lm_head runs in chunks of tokens (alignflow.train.logprobs), under bf16
    autocast when `precision` is bf16 on CUDA (fp32 master weights, as the SFT stage trains); FSDP computes in bf16
    through its own mixed-precision policy instead."""

    def __init__(self, policy, precision: str = "fp32"):
        super().__init__()
        self.policy, self.precision = policy, precision

    def forward(self, input_ids, attention_mask, completion_len: int, temperature: float, return_entropy: bool = False):
        with autocast(input_ids.device.type, self.precision):
            return token_logprobs(self.policy, input_ids, attention_mask, completion_len, temperature, return_entropy)


def _precision(cfg: RLConfig, model) -> str:
    """bf16 (autocast update, bf16 static-engine weights) only where it means something: on CUDA."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    return "bf16" if cfg.precision == "bf16" and on_cuda else "fp32"


# Largest |log-prob difference| a sync of the bf16 engine copy may show against the fp32 trainer on the probe and
# its greedy continuation. Measured on an H100 at random weights (issue 18): 0.021 at the Qwen2.5-0.5B shape, 0.050
# at 1.5B, so the engine's own bf16 default (5e-2) had no margin; trained models' larger logits round coarser in
# bf16 (spacing 0.125 above 16). A sync that did not take is still caught below this: the engine must move with the
# trainer (once it moved 4x the noise seen at earlier syncs, alignflow.rollout.sync), and the trainer's weights must
# keep the fingerprint of the last sync.
BF16_SYNC_TOLERANCE = 0.25


def _engine(cfg: RLConfig, model, tokenizer, precision: str, replica=None):
    """The rollout engine; the static engine keeps its own bf16 copy of the weights under bf16 (`sync` copies the
    fp32 trainer's weights into it and verifies them at BF16_SYNC_TOLERANCE, alignflow.rollout.sync). `replica`:
    this rank's full copy of a sharded policy (FSDP), which the engine samples from and every sync refreshes."""
    if replica is not None:
        bf16 = next(replica.parameters()).dtype == torch.bfloat16
        return make_engine(cfg.engine, replica, tokenizer, tolerance=BF16_SYNC_TOLERANCE if bf16 else None)
    if cfg.engine == "static" and precision == "bf16" and next(model.parameters()).dtype != torch.bfloat16:
        return make_engine(cfg.engine, model, tokenizer, dtype=torch.bfloat16, tolerance=BF16_SYNC_TOLERANCE)
    return make_engine(cfg.engine, model, tokenizer)


class _PromptStream:
    """The run's prompts as rollout hooks see them (alignflow.algorithms.RolloutSource): seeded draws, rollouts."""

    def __init__(self, engine, tokenizer, cfg: RLConfig, reward: RewardSet, rows: TaskRows, solutions, generator):
        self.prompts_per_step, self.pad_id = cfg.prompts_per_step, tokenizer.pad_token_id
        self._engine, self._tokenizer, self._cfg, self._reward = engine, tokenizer, cfg, reward
        self._rows, self._solutions, self._generator = rows, solutions, generator
        self.start_step()

    def start_step(self) -> None:
        """Reset the per-step reward figures (a hook may roll out several times in one step)."""
        self.reward_errors, self.reward_problems, self._sums, self._counts = 0, {}, {}, {}

    def reward_means(self) -> dict[str, float]:
        """Per-function mean reward of this step's rollouts (over the samples each function scored)."""
        return {f"reward/{label}": self._sums[label] / self._counts[label] for label in self._sums if self._counts[label]}

    def draw(self, n: int) -> list[int]:
        """n prompts of the global batch; under torchrun each rank gets its n / world_size share of them."""
        return distributed.shard(torch.randint(len(self._rows), (n,), generator=self._generator).tolist())

    def prompt(self, index: int) -> str:
        return self._rows.prompts[index]

    def solution(self, index: int) -> str | None:
        return self._solutions[index] if self._solutions is not None else None

    def rollout(self, indices: list[int], contexts: list[str] | None = None) -> RolloutBatch:
        batch, result = _rollout_batch(self._engine, self._tokenizer, self._rows.take(indices), self._cfg,
                                       self._reward, contexts)
        self.reward_errors += result.n_errors
        self.reward_problems.update(result.problems)
        for label, values in result.per_function.items():
            scored = [v for v in values if v is not None]
            self._sums[label] = self._sums.get(label, 0.0) + sum(scored)
            self._counts[label] = self._counts.get(label, 0) + len(scored)
        return batch


# ---------------------------------------------------------------- extra inputs ("needs")
def _with_prompts(tokenizer, user_texts: list[str], completion_ids, completion_attention):
    """Chat prompts (left-padded) followed by given completions. -> (input_ids, attention_mask)"""
    enc = tokenizer([chat_prompt(tokenizer, t) for t in user_texts], return_tensors="pt", padding=True,
                    padding_side="left", add_special_tokens=False).to(completion_ids.device)  # the template has BOS
    return (torch.cat([enc["input_ids"], completion_ids], 1),
            torch.cat([enc["attention_mask"], completion_attention.to(enc["attention_mask"].dtype)], 1))


def _expert_rows(tokenizer, pairs: list[tuple[str, str]], device) -> RolloutBatch:
    """Demonstrations as batch rows: the chat prompt, then the response + EOS as the 'completion'."""
    enc = tokenizer([r + tokenizer.eos_token for _, r in pairs], return_tensors="pt", padding=True,
                    padding_side="right", add_special_tokens=False).to(device)
    ids, attention = _with_prompts(tokenizer, [p for p, _ in pairs], enc["input_ids"], enc["attention_mask"])
    n, T = enc["input_ids"].shape
    zeros = torch.zeros(n, T, device=device)
    return RolloutBatch(input_ids=ids, attention_mask=attention, completion_mask=enc["attention_mask"],
                        rewards=torch.zeros(n), group_ids=torch.arange(n),
                        old_logprobs=zeros, rollout_logprobs=zeros.clone(),
                        is_expert=torch.ones(n, dtype=torch.bool, device=device), prompts=[p for p, _ in pairs])


def _separator_ids(tokenizer) -> torch.Tensor:
    """Token ids whose text contains a step separator (';' or a newline). -> [V] bool"""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return torch.tensor([(";" in t) or ("\n" in t) for t in texts])


def _step_ids(batch: RolloutBatch, is_separator: torch.Tensor) -> torch.Tensor:
    """Index of the reasoning step of each completion token; a separator belongs to the step it ends. -> [B, T]"""
    sep = is_separator.to(batch.input_ids.device)[batch.input_ids[:, -batch.completion_len:]].long()
    return sep.cumsum(-1) - sep


MODELS_OWN_TEMPERATURE = 1.0   # reference / base / teacher / privileged log-probs: the models' own distributions


def _fill_inputs(batch: RolloutBatch, inputs: frozenset[str], model, extra: ExtraModels, tokenizer, cfg: RLConfig,
                 solution_of: dict, history: RewardHistory | None, is_separator, engine_is_trainer: bool = False,
                 precision: str = "fp32") -> None:
    T, ids, attention = batch.completion_len, batch.input_ids, batch.attention_mask
    with torch.no_grad(), autocast(ids.device.type, precision):   # as the update scores (_Scorer)
        # the trainer's log-probs of the policy that sampled (pi_old), and its entropies if needed; an engine that
        # samples from the trainer's own model object already returned them (equal to ~1e-6), saving a forward pass
        if engine_is_trainer and "entropy" not in inputs and batch.is_expert is None:
            batch.old_logprobs, batch.entropy = batch.rollout_logprobs, None
        else:
            scored = token_logprobs(model, ids, attention, T, cfg.temperature, return_entropy="entropy" in inputs)
            batch.old_logprobs, batch.entropy = scored if "entropy" in inputs else (scored, None)
        if batch.is_expert is not None:  # demonstrations were not sampled by the engine: nothing to correct
            batch.rollout_logprobs = torch.where(batch.is_expert[:, None], batch.old_logprobs, batch.rollout_logprobs)
        # frozen models (and the privileged teacher below) score at temperature 1, their own distributions (SRPPO's
        # implicit reward, G-OPD's teacher, the KL's reference); the policy's log-probs above are at the sampling
        # temperature, the distribution the ratio's pi_old sampled from (as TRL)
        for need in ("ref", "base", "teacher"):
            if need in inputs:
                scores = token_logprobs(getattr(extra, need), ids, attention, T, MODELS_OWN_TEMPERATURE)
                setattr(batch, f"{need}_logprobs", scores)
        if "privileged" in inputs:
            shown = [PRIVILEGED_TEMPLATE.format(prompt=p, solution=solution_of[p]) for p in batch.prompts]
            contexts = [shown[int(g)] for g in batch.group_ids]
            priv_ids, priv_attention = _with_prompts(tokenizer, contexts, ids[:, -T:], attention[:, -T:])
            batch.privileged_logprobs = token_logprobs(model, priv_ids, priv_attention, T, MODELS_OWN_TEMPERATURE)
    if "steps" in inputs:
        batch.step_ids = _step_ids(batch, is_separator)
    if "history" in inputs:
        # every rank's groups go into every rank's history (identical state, so rank 0's checkpoint holds all)
        batch.times_seen, batch.history_mean, batch.history_std = shared_history_update(
            history, batch.prompts, batch.rewards, batch.group_ids)


def _check_inputs(name: str, inputs: frozenset[str], extra: ExtraModels, prompts, solutions, expert) -> None:
    missing = [f"a {need!r} model (extra_models=ExtraModels({need}=...))" for need in ("ref", "base", "teacher")
               if need in inputs and getattr(extra, need) is None]
    if inputs & {"solutions", "privileged"} and (solutions is None or len(solutions) != len(prompts)):
        missing.append("a worked solution per prompt (solutions=[...], aligned with prompts)")
    if "expert" in inputs and not expert:
        missing.append("expert demonstrations (expert=[(prompt, response), ...])")
    if missing:
        raise ValueError(f"algorithm {name!r} needs " + "; ".join(missing))


# ---------------------------------------------------------------- the loop
def _warn_zero_rewards(steps: int, source: _PromptStream, batch: RolloutBatch, tokenizer) -> None:
    """Say why a run learns nothing: every reward 0 for `steps` steps (no signal for any method)."""
    sample = tokenizer.decode(batch.input_ids[0, -batch.completion_len:], skip_special_tokens=True)
    why = ("; ".join(f"{label}: {problem}" for label, problem in source.reward_problems.items())
           or "no reward function failed, so they ran and scored every completion 0")
    log.warning("every reward was 0 for the last %d RL steps: there is nothing to learn from. %s. A completion: %r. "
                "Check that the reward functions read the completion's format and the data columns they need, and "
                "that the SFT policy can solve some prompts (rl.temperature, more SFT).", steps, why, sample[:200])


def _resume(ckpt_dir: Path, run: str, model, optimizer, scheduler, data_gen: torch.Generator,
            history: RewardHistory | None) -> int:
    """Restore the newest checkpoint of this run (every rank reads the one rank 0 wrote); the step to start at."""
    state = checkpoint.load_latest(ckpt_dir / "state", model, optimizer, scheduler)
    if not state:
        return 0
    # a warning, so it shows on every rank (a flow's log_prints turns print() into INFO logs, hidden by default)
    log.warning("rl %s: rank %d resumes from step %d (%s)", run, distributed.rank(), state["step"], ckpt_dir)
    data_gen.set_state(state["extra"]["data_generator"])  # shared by all ranks: they split each step's draw
    if history is not None:
        history.load_state_dict(state["extra"]["reward_history"])
    return state["step"]


def _checkpoint(ckpt_dir: Path, step: int, model, optimizer, scheduler, data_gen: torch.Generator,
                history: RewardHistory | None) -> None:
    extra_state = {"data_generator": data_gen.get_state()}
    if history is not None:
        extra_state["reward_history"] = history.state_dict()
    checkpoint.save(ckpt_dir / "state", step, model, optimizer, scheduler, extra=extra_state)


def _rollout(source: _PromptStream, engine, algo, hp: dict, inputs: frozenset[str], expert, data_gen, tokenizer):
    """One step's samples through the preset's rollout hook, their rewards and reward metrics, then (CHORD) the
    expert demonstrations mixed in. -> (batch, metrics, whether every sampled reward was 0)"""
    source.start_step()
    engine.check_synced()  # the trainer's weights are those of the last verified sync (else WeightSyncError)
    batch, metrics = ROLLOUTS[algo.rollout](source, hp)
    best = torch.zeros(batch.n_groups).scatter_reduce(0, batch.group_ids.cpu(), batch.rewards.float(), "amax",
                                                      include_self=False)
    metrics.update(reward=float(batch.rewards.mean()), reward_errors=source.reward_errors,
                   zero_reward_groups=float((best <= 0).float().mean()),  # no group-relative signal there
                   completion_len=float(batch.completion_mask.sum(-1).float().mean()), **source.reward_means())
    all_zero = bool((batch.rewards == 0).all())
    if "expert" in inputs:
        n_expert = max(1, round(hp["expert_share"] / (1 - hp["expert_share"]) * len(batch.rewards)))
        picks = torch.randint(len(expert), (n_expert,), generator=data_gen).tolist()
        rows = _expert_rows(tokenizer, [expert[i] for i in picks], batch.input_ids.device)
        batch = concat_batches([batch, rows], tokenizer.pad_token_id)
    return batch, metrics, all_zero


def _sync_and_check(engine, model, batch: RolloutBatch, adv: torch.Tensor, mask: torch.Tensor) -> dict:
    """After the update: the engine synced to the trainer and verified (WeightSyncError if not), the ranks
    checked in step, and the importance ratios the update saw (rollout vs trainer log-probs)."""
    tis = torch.exp(batch.old_logprobs - batch.rollout_logprobs)[mask.bool()]
    return dict(sync_max_abs_diff=engine.sync(model), tis_ratio_mean=tis.mean().item(),
                rank_max_abs_diff=distributed.check_in_sync(engine.probe_logprobs),
                tis_ratio_max=tis.max().item(), advantage_abs_mean=adv[mask.bool()].abs().mean().item())


def train_candidate(model, tokenizer, cand: CandidateConfig, seed: int, cfg: RLConfig, prompts: TaskRows | list[str],
                    answers: list[str] | None, ckpt_dir: Path, on_log: Callable[[int, dict], None],
                    ref_model=None, reward_fn=accuracy_reward, max_nonfinite: int = 5, *,
                    extra_models: ExtraModels | None = None, solutions: list[str] | None = None,
                    expert: list[tuple[str, str]] | None = None, zero_reward_patience: int = 10) -> RunResult:
    """`prompts`: the RL rows (TaskRows: chats, prompt texts, columns for the rewards), or plain user prompts with
    `answers` (the column `answer`). `reward_fn`: a RewardSet, or one TRL-convention function.
    `ref_model` is kept for callers that predate `extra_models` (it fills ExtraModels.ref).
    `solutions`: the worked solution of each prompt (privileged info / oracle; needs "solutions", "privileged").
    `expert`: (prompt, response) demonstrations to mix in (needs "expert").
    `zero_reward_patience`: warn once when every sample's reward was 0 for that many steps in a row."""
    rows = prompts if isinstance(prompts, TaskRows) else TaskRows.from_texts(prompts, answer=list(answers))
    prompts = rows.prompts
    reward = reward_fn if isinstance(reward_fn, RewardSet) else RewardSet.of(reward_fn)
    algo = ALGORITHMS[cand.algorithm]
    hp = algo.hparams(cand.hparams)
    inputs = algo.inputs(cand.hparams)
    extra = extra_models or ExtraModels()
    if extra.ref is None:
        extra.ref = ref_model
    _check_inputs(algo.name, inputs, extra, prompts, solutions, expert)
    if cfg.prompts_per_step % distributed.world_size():
        raise ValueError(f"rl.prompts_per_step={cfg.prompts_per_step} must be a multiple of the number of ranks "
                         f"({distributed.world_size()})")
    torch.manual_seed(seed)
    data_gen = torch.Generator().manual_seed(seed)
    precision = _precision(cfg, model)
    sharded = distributed.shards(cfg.parallel)
    # FSDP: this rank's full copy for its engine, taken before sharding (bf16 under bf16: the engine's dtype)
    replica = copy.deepcopy(model) if sharded else None
    if replica is not None and precision == "bf16":
        replica.to(torch.bfloat16)
    scorer = _Scorer(model, "fp32" if sharded else precision)  # FSDP's mixed precision replaces autocast
    trainer = distributed.wrap(scorer, cfg.parallel, bf16=precision == "bf16")
    policy = scorer if sharded else model   # what the loop's own forwards call (a sharded policy: through its root)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cand.lr, weight_decay=0.0)   # this rank's shards if FSDP
    warmup = max(1, cand.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    history = RewardHistory() if "history" in inputs else None
    start = _resume(ckpt_dir, f"{cand.name} s{seed}", model, optimizer, scheduler, data_gen, history)
    if distributed.rank():  # every rank samples its own completions (rank 0 keeps the single-process stream)
        torch.manual_seed(seed + 7919 * distributed.rank() + start)
    engine = _engine(cfg, model, tokenizer, precision, replica)
    if sharded:  # the copy was taken before a resume: gather the trainer's weights into it (and verify them)
        engine.sync(policy)
    source = _PromptStream(engine, tokenizer, cfg, reward, rows, solutions, data_gen)
    zero_steps = 0
    solution_of = dict(zip(prompts, solutions)) if solutions is not None else {}
    is_separator = _separator_ids(tokenizer) if "steps" in inputs else None
    counters = UpdateCounters(slice_rows=cfg.micro_batch_size)
    bar = tqdm(range(start, cand.steps), desc=f"rl {cand.name} s{seed}", initial=start, total=cand.steps, mininterval=2,
               disable=not distributed.is_main())
    for step in bar:
        started = time.perf_counter()
        batch, metrics, all_zero = _rollout(source, engine, algo, hp, inputs, expert, data_gen, tokenizer)
        zero_steps = zero_steps + 1 if all_zero else 0
        if zero_steps == zero_reward_patience:
            _warn_zero_rewards(zero_steps, source, batch, tokenizer)
        batch.step, batch.total_steps = step, cand.steps
        # ---- the extra inputs the method needs, then its advantage
        rolled_out = time.perf_counter()  # rewards are Python floats: the rollout has finished on the device
        _fill_inputs(batch, inputs, policy, extra, tokenizer, cfg, solution_of, history, is_separator,
                     engine_is_trainer=not sharded and getattr(engine, "shares_trainer_weights", False),
                     precision=precision)
        mask = batch.completion_mask.to(torch.float32)
        adv = ADVANTAGES[algo.advantage](batch, hp).detach()
        # ---- update: ppo_epochs x mini-batches optimizer steps (old_logprobs stay those of the sampling policy)
        metrics.update(update_policy(trainer, model, optimizer, scheduler, batch, adv, mask, algo, hp, cfg, counters,
                                      max_nonfinite, step))
        updated = time.perf_counter()  # loss.item() / grad_norm.item() waited for the backward and the all-reduce
        # ---- weight sync (verified), logging, checkpoints
        metrics.update(skipped_updates=counters.skipped, **_sync_and_check(engine, policy, batch, adv, mask))
        metrics["reward"] = distributed.mean_across_ranks(metrics["reward"], model.device)
        done = time.perf_counter()  # after the all-reduce of the reward: the slowest rank's step
        metrics.update(step_seconds=done - started, rollout_seconds=rolled_out - started,
                       update_seconds=updated - rolled_out, sync_seconds=done - updated)
        bar.set_postfix(reward=f"{metrics['reward']:.2f}", refresh=False)
        if distributed.is_main():  # rank 0 logs for all
            on_log(step + 1, metrics)
        # rank 0 writes a replicated policy alone; a sharded one is gathered to rank 0 (snapshots) or written in
        # shards by every rank (resume state), so every rank calls these
        if step + 1 in cand.checkpoints:  # a candidate policy
            save(model, tokenizer, ckpt_dir / "snapshots" / f"{cand.name}-s{seed}-{step + 1}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cand.steps:  # resume state
            _checkpoint(ckpt_dir, step + 1, model, optimizer, scheduler, data_gen, history)
        faults.maybe_kill("rl", step + 1)
    bar.close()
    distributed.barrier()  # the last snapshot is written before any rank returns
    getattr(engine, "close", lambda: None)()  # an engine in its own process (vllm) stops here
    snapshots = [ckpt_dir / "snapshots" / f"{cand.name}-s{seed}-{c}" for c in cand.checkpoints]
    return RunResult(snapshots=snapshots, resumed_from=start, skipped_updates=counters.skipped)


def publish(snapshots: list[Path], out_dir: Path) -> None:
    """Copy finished snapshots into the stage's outs (DVC deletes outs before a re-run; checkpoints survive)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for snap in snapshots:
        shutil.copytree(snap, out_dir / snap.name, dirs_exist_ok=True)
