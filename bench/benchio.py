"""What the GPU benchmark scripts share: flushed, timestamped logging, their result dict written whole after each
section (a call cut short by its time limit keeps what it measured), and CUDA-event timing."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

T0 = time.perf_counter()


def log(*a) -> None:
    print(f"[{time.perf_counter() - T0:6.0f}s]", *a, flush=True)


def save(result: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2, default=str))


def cuda_ms(fn, reps: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of fn() on the current CUDA stream, timed by CUDA events after `warmup` calls."""
    import torch
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)
