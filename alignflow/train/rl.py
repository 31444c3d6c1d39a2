"""The one on-policy loop: rollout -> reward -> advantage -> update -> weight sync (verified).

Every method is a preset of registered pieces (alignflow/algorithms); this file never names one.
Resumable: training state is checkpointed every `checkpoint_every` steps into `ckpt_dir` (outside DVC's
outs), and the candidate snapshots are kept there too until the stage copies them into its outs.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from alignflow import checkpoint
from alignflow.algorithms import ADVANTAGES, ALGORITHMS, LOSS_AGGS, POLICY_LOSSES, RolloutBatch
from alignflow.config import CandidateConfig, RLConfig
from alignflow.models import chat_prompt, save
from alignflow.rewards import accuracy_reward, safe_rewards
from alignflow.rollout import Sampling, make_engine, token_logprobs


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class RunResult:
    snapshots: list[Path]
    resumed_from: int
    skipped_updates: int


def _rollout_batch(engine, tokenizer, prompts, answers, cfg: RLConfig, reward_fn) -> tuple[RolloutBatch, dict]:
    completions = engine.generate([chat_prompt(tokenizer, p) for p in prompts], cfg.group_size,
                                  Sampling(cfg.max_new_tokens, cfg.temperature))
    rep_prompts = [p for p in prompts for _ in range(cfg.group_size)]
    rep_answers = [a for a in answers for _ in range(cfg.group_size)]
    rewards, reward_errors = safe_rewards(reward_fn, rep_prompts, completions.texts, answer=rep_answers)
    batch = RolloutBatch(input_ids=completions.input_ids, attention_mask=completions.attention_mask,
                         completion_mask=completions.completion_mask, rewards=torch.tensor(rewards),
                         group_ids=completions.prompt_index, old_logprobs=completions.logprobs,
                         rollout_logprobs=completions.logprobs)
    return batch, {"reward": float(batch.rewards.mean()), "reward_errors": reward_errors,
                   "completion_len": float(completions.completion_mask.sum(-1).float().mean())}


def train_candidate(model, tokenizer, cand: CandidateConfig, seed: int, cfg: RLConfig, prompts: list[str],
                    answers: list[str], ckpt_dir: Path, on_log: Callable[[int, dict], None],
                    ref_model=None, reward_fn=accuracy_reward, max_nonfinite: int = 5) -> RunResult:
    algo = ALGORITHMS[cand.algorithm]
    hp = algo.hparams(cand.hparams)
    torch.manual_seed(seed)
    data_gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cand.lr, weight_decay=0.0)
    state = checkpoint.load_latest(ckpt_dir / "state", model, optimizer)
    start = state["step"] if state else 0
    if state:
        data_gen.set_state(state["extra"]["data_generator"])
    engine = make_engine(cfg.engine, model, tokenizer)
    mask_dtype, nonfinite_in_row, skipped = torch.float32, 0, 0
    bar = tqdm(range(start, cand.steps), desc=f"rl {cand.name} s{seed}", initial=start, total=cand.steps, mininterval=2)
    for step in bar:
        idx = torch.randint(len(prompts), (cfg.prompts_per_step,), generator=data_gen).tolist()
        batch, metrics = _rollout_batch(engine, tokenizer, [prompts[i] for i in idx], [answers[i] for i in idx],
                                        cfg, reward_fn)
        T, mask = batch.completion_len, batch.completion_mask.to(mask_dtype)
        if ref_model is not None:
            with torch.no_grad():
                batch.ref_logprobs = token_logprobs(ref_model, batch.input_ids, batch.attention_mask, T, cfg.temperature)
        if cfg.ppo_epochs > 1:  # several passes over one batch need the pre-update log-probs fixed
            with torch.no_grad():
                batch.old_logprobs = token_logprobs(model, batch.input_ids, batch.attention_mask, T, cfg.temperature)
        adv = ADVANTAGES[algo.advantage](batch, hp).detach()
        for _ in range(cfg.ppo_epochs):
            logp = token_logprobs(model, batch.input_ids, batch.attention_mask, T, cfg.temperature)
            if cfg.ppo_epochs == 1:
                batch.old_logprobs = logp.detach()
            token_loss, loss_metrics = POLICY_LOSSES[algo.policy_loss](logp, batch, adv, hp)
            loss = LOSS_AGGS[algo.loss_agg](token_loss, mask, hp)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if not (math.isfinite(loss.item()) and math.isfinite(grad_norm.item())):
                nonfinite_in_row, skipped = nonfinite_in_row + 1, skipped + 1
                optimizer.zero_grad(set_to_none=True)
                if nonfinite_in_row >= max_nonfinite:
                    raise NonFiniteLossError(f"{nonfinite_in_row} non-finite losses/gradients in a row at step "
                                             f"{step + 1}; lower rl.candidates.*.lr or check the reward")
                continue
            nonfinite_in_row = 0
            optimizer.step()
        tis = torch.exp(batch.old_logprobs - batch.rollout_logprobs)[mask.bool()]
        metrics.update(loss=loss.item(), grad_norm=grad_norm.item(), skipped_updates=skipped,
                       sync_max_abs_diff=engine.sync(model), tis_ratio_mean=tis.mean().item(),
                       tis_ratio_max=tis.max().item(), **loss_metrics)
        on_log(step + 1, metrics)
        bar.set_postfix(reward=f"{metrics['reward']:.2f}")
        if step + 1 in cand.checkpoints:
            save(model, tokenizer, ckpt_dir / "snapshots" / f"{cand.name}-s{seed}-{step + 1}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cand.steps:
            checkpoint.save(ckpt_dir / "state", step + 1, model, optimizer,
                            extra={"data_generator": data_gen.get_state()})
    bar.close()
    snapshots = [ckpt_dir / "snapshots" / f"{cand.name}-s{seed}-{c}" for c in cand.checkpoints]
    return RunResult(snapshots=snapshots, resumed_from=start, skipped_updates=skipped)


def publish(snapshots: list[Path], out_dir: Path) -> None:
    """Copy finished snapshots into the stage's outs (DVC deletes outs before a re-run; checkpoints survive)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for snap in snapshots:
        shutil.copytree(snap, out_dir / snap.name, dirs_exist_ok=True)
