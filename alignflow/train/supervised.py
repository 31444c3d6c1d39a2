"""Next-token training shared by `base` (packed raw text) and `sft` (chat template, loss on the response only).

Under torchrun (the sft stage, `sft.parallel`) every rank draws the same global batch from the shared generator and
trains on its rows r, r+N, ...; the loss is normalised by the global batch's tokens, so N ranks (DDP or FSDP) take
the step one process would. Rank 0 validates, logs and writes; every rank takes its stop decision."""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from alignflow import checkpoint, faults
from alignflow.models import IGNORE, autocast
from alignflow.rollout.sync import load_weights
from alignflow.train import distributed, sharding
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
    """Forward/backward in `micro_batches` slices, each loss scaled by its share of the global batch's tokens (every
    rank's; DDP and FSDP average the ranks' gradients, so each share is scaled by the rank count). -> this rank's
    part of the global loss"""
    faults.maybe_oom(where, step)
    n_tokens = distributed.sum_across_ranks((batch["labels"][:, 1:] != IGNORE).sum()).clamp(min=1)
    total = torch.zeros((), device=batch["input_ids"].device)
    parts = list(zip(*(v.tensor_split(micro_batches) for v in batch.values())))
    for i, part in enumerate(parts):
        micro = dict(zip(batch, part))
        share = (micro["labels"][:, 1:] != IGNORE).sum() / n_tokens
        last = i == len(parts) - 1
        with amp(), contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            loss = faults.maybe_nan(where, step, model(**micro).loss) * share
            (loss * distributed.world_size()).backward()
        total = total + loss.detach()
    return total


def _validate(validate: Callable, model, eval_copy) -> dict:
    """`validate` on rank 0, its result on every rank. A sharded model (FSDP) is gathered into rank 0's full copy
    first (every rank takes part in the gather): generation runs on one rank, not in lockstep over shards."""
    if not sharding.is_sharded(model):
        return distributed.on_main(validate)
    load_weights(eval_copy, model)
    return distributed.on_main(lambda: validate(eval_copy))


def train_lm(model, next_batch: Callable[[], dict] | None, generator: torch.Generator, *, steps: int, lr: float,
             ckpt_dir: Path, checkpoint_every: int, on_log: Callable[[int, dict], None],
             validate: Callable[[], dict] | None = None, validate_every: int = 0,
             stop: Callable[[dict], bool] | None = None, desc: str = "train", precision: str = "fp32",
             max_nonfinite: int = 5, optimizer: torch.optim.Optimizer | None = None,
             step_loss: Callable[[int], tuple[torch.Tensor, dict]] | None = None, parallel=None) -> TrainResult:
    """The one next-token training loop (base, SFT, teacher): AdamW + cosine schedule, clipping at 1, non-finite
    updates skipped, validation and early stop, resume from `ckpt_dir` (the data generator's state is part of the
    checkpoint, so a resumed run sees the same batches as an uninterrupted one).

    Each step's forward/backward is `next_batch()`'s padded batch, in micro-batches halved on out-of-memory; or,
    given `step_loss(step)` (the packed varlen path, fast.train_sft_packed), whatever it draws and backpropagates:
    it returns the step's loss and extra metrics.

    `parallel` (config.ParallelConfig): how the ranks train under torchrun (DDP, or FSDP: the model is sharded in
    place, rank 0 keeps a full copy to validate; `validate(model)` is then called with that copy); activation
    checkpointing in one process too. The caller saves the result with models.save on every rank."""
    device = next(model.parameters()).device
    sharded = distributed.shards(parallel)
    eval_copy = copy.deepcopy(model) if sharded and validate and distributed.is_main() else None
    trainer = model if parallel is None else distributed.wrap(model, parallel, bf16=precision == "bf16"
                                                              and device.type == "cuda")
    precision = "fp32" if sharded else precision   # FSDP's mixed-precision policy replaces autocast
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01,
                                               fused=device.type == "cuda")   # after sharding: this rank's shards
    scheduler = cosine_with_warmup(optimizer, steps, warmup=max(1, steps // 20))
    state = checkpoint.load_latest(ckpt_dir, model, optimizer, scheduler)
    start = state["step"] if state else 0
    if state:
        generator.set_state(state["extra"]["data_generator"])
        if state["extra"].get("stopped"):
            return TrainResult(start, start, True, float("nan"))
    model.train()
    loss_value, stopped, nonfinite_in_row, micro_batches = float("nan"), False, 0, 1
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, mininterval=2,
               disable=not distributed.is_main())
    for step in bar:
        if step_loss is None:   # the global batch (every rank draws it), then this rank's rows
            batch = {k: distributed.shard(v).to(device) for k, v in next_batch().items()}
            loss, micro_batches = retry_in_halves(
                lambda k: _accumulate(trainer, batch, k, lambda: autocast(device.type, precision), desc, step + 1),
                micro_batches, len(batch["input_ids"]), optimizer, f"{desc} step {step + 1}")
            loss = distributed.sum_across_ranks(loss)   # the global loss: every rank skips (or steps) alike
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
            metrics.update(_validate(validate, model, eval_copy))
            model.train()
            stopped = bool(stop and stop(metrics))
        if distributed.is_main():
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
