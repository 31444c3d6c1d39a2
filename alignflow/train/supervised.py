"""Next-token training shared by `base` (packed raw text) and `sft` (chat template, loss on the response only)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from alignflow import checkpoint, faults
from alignflow.models import IGNORE, autocast
from alignflow.train.memory import retry_in_halves

log = logging.getLogger(__name__)


def pack_corpus(tokenizer, texts: list[str]) -> torch.Tensor:
    """One long stream of token ids, documents separated by EOS. -> [N]"""
    eos = tokenizer.eos_token_id
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([t for doc in ids for t in (*doc, eos)], dtype=torch.long)


def packed_batches(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """Random windows of the stream; labels are the inputs (the model shifts them)."""
    def next_batch() -> dict:
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
        ids = torch.stack([stream[s:s + seq_len] for s in starts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    return next_batch


def sft_batches(examples, batch_size: int, pad_id: int, generator: torch.Generator):
    def next_batch() -> dict:
        idx = torch.randint(0, len(examples), (batch_size,), generator=generator).tolist()
        width = max(len(examples[i][0]) for i in idx)
        ids = torch.full((batch_size, width), pad_id)
        labels = torch.full((batch_size, width), IGNORE)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, i in enumerate(idx):  # right padding: positions stay 0..n-1
            n = len(examples[i][0])
            ids[row, :n], labels[row, :n], mask[row, :n] = (torch.tensor(examples[i][0]), torch.tensor(examples[i][1]), 1)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return next_batch


@dataclass
class TrainResult:
    steps_run: int
    resumed_from: int
    stopped_early: bool
    last_loss: float


def cosine_with_warmup(optimizer, steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class NonFiniteLossError(RuntimeError):
    pass


def _accumulate(model, batch: dict, micro_batches: int, amp: Callable, where: str, step: int) -> torch.Tensor:
    """Forward/backward in `micro_batches` slices, each loss scaled by its share of the batch's tokens."""
    faults.maybe_oom(where, step)
    n_tokens = (batch["labels"][:, 1:] != IGNORE).sum().clamp(min=1)
    total = torch.zeros((), device=batch["input_ids"].device)
    for part in zip(*(v.tensor_split(micro_batches) for v in batch.values())):
        micro = dict(zip(batch, part))
        share = (micro["labels"][:, 1:] != IGNORE).sum() / n_tokens
        with amp():
            loss = faults.maybe_nan(where, step, model(**micro).loss) * share
        loss.backward()
        total = total + loss.detach()
    return total


def train_lm(model, next_batch: Callable[[], dict] | None, generator: torch.Generator, *, steps: int, lr: float,
             ckpt_dir: Path, checkpoint_every: int, on_log: Callable[[int, dict], None],
             validate: Callable[[], dict] | None = None, validate_every: int = 0,
             stop: Callable[[dict], bool] | None = None, desc: str = "train", precision: str = "fp32",
             max_nonfinite: int = 5, optimizer: torch.optim.Optimizer | None = None,
             step_loss: Callable[[int], tuple[torch.Tensor, dict]] | None = None) -> TrainResult:
    """The one next-token training loop (base, SFT, teacher): AdamW + cosine schedule, clipping at 1, non-finite
    updates skipped, validation and early stop, resume from `ckpt_dir` (the data generator's state is part of the
    checkpoint, so a resumed run sees the same batches as an uninterrupted one).

    Each step's forward/backward is `next_batch()`'s padded batch, in micro-batches halved on out-of-memory; or,
    given `step_loss(step)` (the packed varlen path, fast.train_sft_packed), whatever it draws and backpropagates:
    it returns the step's loss and extra metrics."""
    device = next(model.parameters()).device
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01,
                                               fused=device.type == "cuda")
    scheduler = cosine_with_warmup(optimizer, steps, warmup=max(1, steps // 20))
    state = checkpoint.load_latest(ckpt_dir, model, optimizer, scheduler)
    start = state["step"] if state else 0
    if state:
        generator.set_state(state["extra"]["data_generator"])
        if state["extra"].get("stopped"):
            return TrainResult(start, start, True, float("nan"))
    model.train()
    loss_value, stopped, nonfinite_in_row, micro_batches = float("nan"), False, 0, 1
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, mininterval=2)
    for step in bar:
        if step_loss is None:
            batch = {k: v.to(device) for k, v in next_batch().items()}
            loss, micro_batches = retry_in_halves(
                lambda k: _accumulate(model, batch, k, lambda: autocast(device.type, precision), desc, step + 1),
                micro_batches, len(batch["input_ids"]), optimizer, f"{desc} step {step + 1}")
            extra = {"micro_batches": micro_batches}
        else:
            loss, extra = step_loss(step)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            nonfinite_in_row += 1
            log.warning("%s step %d: non-finite loss or gradient; update skipped (%d in a row)", desc, step + 1,
                        nonfinite_in_row)
            if nonfinite_in_row >= max_nonfinite:
                raise NonFiniteLossError(f"{desc}: {nonfinite_in_row} non-finite losses in a row at step {step + 1}; "
                                         "lower the learning rate or check the data")
            optimizer.zero_grad(set_to_none=True)
        else:
            nonfinite_in_row = 0
            optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        metrics = {"loss": loss_value, "lr": scheduler.get_last_lr()[0], **extra,
                   "skipped_update": float(nonfinite_in_row > 0)}
        if validate and validate_every and ((step + 1) % validate_every == 0 or step + 1 == steps):
            metrics.update(validate())
            model.train()
            stopped = bool(stop and stop(metrics))
        on_log(step + 1, metrics)
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        if stopped or (step + 1) % checkpoint_every == 0:
            checkpoint.save(ckpt_dir, step + 1, model, optimizer, scheduler,
                            extra={"data_generator": generator.get_state(), "stopped": stopped})
        faults.maybe_kill(desc, step + 1)
        if stopped:
            break
    bar.close()
    return TrainResult(steps_run=step + 1 - start if steps > start else 0, resumed_from=start,
                       stopped_early=stopped, last_loss=loss_value)
