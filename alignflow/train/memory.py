"""Out-of-memory handling shared by the training loops (SFT/base/teacher and RL)."""
from __future__ import annotations

import logging
from typing import Callable, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")


def retry_in_halves(step: Callable[[int], T], micro_batches: int, rows: int, optimizer, where: str) -> tuple[T, int]:
    """Run `step(micro_batches)` (a forward/backward with gradients accumulated over that many slices); on an
    out-of-memory error drop the partial gradients and retry in twice as many slices (the same effective batch),
    until slices would be smaller than one row. -> (step's result, the micro-batch count that worked)"""
    while True:
        optimizer.zero_grad(set_to_none=True)
        try:
            return step(micro_batches), micro_batches
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            if micro_batches >= rows:
                raise
            micro_batches *= 2
            log.warning("%s: out of memory; retrying the update in %d micro-batches", where, micro_batches)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
