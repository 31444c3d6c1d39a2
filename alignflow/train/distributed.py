"""Data parallelism across the GPUs (or CPU processes) of one host, through torchrun and PyTorch DDP.

    torchrun --nproc_per_node 2 -m alignflow.steps rl --pipeline gpu

is how a GPU work pool's job launches the RL stage on N GPUs (docs/scaling.md §6). Every rank holds
the whole policy and its own in-process rollout engine; a step's prompts are drawn from one seeded stream
that all ranks share and split between them, so N ranks see the same global batch a single process would.
DDP averages the gradients, so every rank applies the same update and the weights stay identical; the loop
verifies that with a probe after every step (`check_in_sync`). Rank 0 alone logs, checkpoints and publishes.
With `parallel.strategy: fsdp` the ranks shard the policy instead of replicating it (alignflow/train/sharding.py).
Without torchrun's environment (WORLD_SIZE unset) everything here is a no-op and the loop runs as one process.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


class RanksOutOfSyncError(RuntimeError):
    pass


def init_from_env() -> None:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU) once; pin this rank to its GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))   # "cuda" now means this rank's GPU
        dist.init_process_group("nccl", device_id=torch.device("cuda", int(os.environ["LOCAL_RANK"])))
    else:
        dist.init_process_group("gloo")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def shard(items: list) -> list:
    """This rank's share of a list every rank holds in the same order (rank r takes items r, r+N, ...)."""
    return items[rank()::world_size()]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_across_ranks(value: float, device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world_size()


def _collective_device() -> torch.device:
    """Where a collective's tensor must live: NCCL reduces GPU tensors only, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def min_across_ranks(value: int) -> int:
    """The smallest of every rank's `value` (e.g. how many optimizer steps all ranks can take: DDP needs each
    rank in every all-reduce)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def sum_across_ranks(values):
    """Sum over the ranks of a float, a 0-d tensor or a list of floats (the same shape back); as is outside
    torchrun."""
    if not dist.is_initialized():
        return values
    t = torch.as_tensor(values, dtype=torch.float64).to(_collective_device())
    dist.all_reduce(t)
    if isinstance(values, torch.Tensor):
        return t.to(values.device, values.dtype)
    return t.tolist()


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] outside torchrun."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def max_across_ranks(value: int) -> int:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def wrap(module: torch.nn.Module, parallel=None, bf16: bool = False) -> torch.nn.Module:
    """`module` as the ranks train it (`parallel`: a config.ParallelConfig; None = DDP): DDP around it (broadcasts
    rank 0's weights, then all-reduces grads), or sharded in place by FSDP2 (alignflow.train.sharding; `bf16`: bf16
    compute, fp32 gradient reduction). Activation checkpointing, when asked, applies in one process too."""
    from alignflow.train import sharding
    if parallel is not None and parallel.activation_checkpointing:
        sharding.checkpoint_activations(module)
    if not dist.is_initialized():
        return module
    if shards(parallel):
        return sharding.shard(module, bf16)
    device = next(module.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def shards(parallel) -> bool:
    """Whether `wrap` shards (FSDP across ranks) rather than replicates."""
    return dist.is_initialized() and parallel is not None and parallel.strategy == "fsdp"


def on_main(compute):
    """`compute()` run on rank 0 alone, its result returned on every rank (e.g. a validation every rank's stop
    decision depends on)."""
    if not dist.is_initialized():
        return compute()
    out = [compute() if is_main() else None]
    dist.broadcast_object_list(out, src=0)
    return out[0]


def check_in_sync(probe_logprobs, tolerance: float = 1e-4) -> float:
    """Max |difference| between ranks of the log-probs `probe_logprobs()` returns (a fixed probe sequence scored
    by this rank's weights) and rank 0's; raises if over `tolerance`."""
    if not dist.is_initialized():
        return 0.0
    probe_logprobs = probe_logprobs()
    reference = probe_logprobs.detach().clone()
    dist.broadcast(reference, src=0)
    diff = torch.tensor([(probe_logprobs - reference).abs().max().item()], device=probe_logprobs.device)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if not diff.item() <= tolerance:
        raise RanksOutOfSyncError(f"rank weights diverged: probe log-probs differ by {diff.item():.2e} across ranks "
                                  f"(tolerance {tolerance:.0e})")
    return diff.item()


@contextmanager
def process_group():
    """For a command's main(): join the group if launched by torchrun, leave it cleanly at the end."""
    init_from_env()
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
