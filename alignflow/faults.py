"""Fault injection for the reliability tests and the chaos benchmark (never set in normal runs).

ALIGNFLOW_FAULT="<kind>:<where>:<step>[,...]" with kind one of
  kill  SIGKILL this process right after that step's bookkeeping (a crash mid-stage)
  nan   make that step's loss NaN (numerical trouble)
  oom   raise an out-of-memory error in that step's forward pass (once)
and <where> the loop's name ("base", "sft", "teacher", "rl").
"""
from __future__ import annotations

import os
import signal

_fired: set[tuple[str, str, int]] = set()


def _wanted(kind: str, where: str, step: int) -> bool:
    for spec in filter(None, os.environ.get("ALIGNFLOW_FAULT", "").split(",")):
        k, w, s = spec.split(":")
        if (k, w, int(s)) == (kind, where, step) and (k, w, int(s)) not in _fired:
            _fired.add((k, w, int(s)))
            return True
    return False


def maybe_kill(where: str, step: int) -> None:
    if _wanted("kill", where, step):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_nan(where: str, step: int, loss):
    return loss * float("nan") if _wanted("nan", where, step) else loss


def maybe_oom(where: str, step: int) -> None:
    if _wanted("oom", where, step):
        import torch
        raise torch.OutOfMemoryError("injected out-of-memory (ALIGNFLOW_FAULT)")
