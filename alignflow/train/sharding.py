"""FSDP2 for the RL and SFT stages (`rl.parallel.strategy: fsdp`, `sft.parallel.strategy: fsdp`; docs/scaling.md).

PyTorch's own `fully_shard`: each decoder layer is one unit (its weights all-gathered just before its forward and
backward, its gradients reduce-scattered after), then the root, which holds the rest (embeddings, final norm,
lm_head, tied or not). Parameters, gradients and AdamW state live as shards (DTensors), 1/N of each per rank.
Under precision bf16 on CUDA the layers compute in bf16 and gradients reduce in fp32 (MixedPrecisionPolicy);
on CPU (gloo) everything stays fp32. What leaves a stage is whole: `full_state_dict` gathers the weights to
rank 0 for `models.save`, and rollout engines gather them tensor by tensor into their own copy
(alignflow.rollout.sync.load_weights). Resume state is sharded: every rank writes and reads its own shards of the
model and optimizer through torch.distributed.checkpoint (`save_state`, `load_state`; alignflow.checkpoint).
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model: the classes it names in `_no_split_modules` (e.g.
    Qwen2DecoderLayer), the unit accelerate and TRL wrap too."""
    names = {name for m in module.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    return [m for m in module.modules() if type(m).__name__ in names]


def _recompute_in_backward(layer: torch.nn.Module, *args, **kwargs):
    """One decoder layer under torch's non-reentrant checkpoint, when there is a backward to replay it for; its KV
    cache left out (the replay would append to it a second time, and a training forward reads none back). Without
    gradients (generating from the trainer's own object, DDP) it runs as is, cache included."""
    if not torch.is_grad_enabled():
        return layer(*args, **kwargs)
    # the cache's names across transformers versions and families (as transformers' GradientCheckpointingLayer)
    kwargs = {k: None if k in ("cache", "layer_past") or k.startswith("past_key_value") else v
              for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False, **kwargs)


def checkpoint_activations(module: torch.nn.Module) -> None:
    """Recompute every decoder layer's activations in the backward instead of keeping them, whatever mode the
    model is in (transformers' own switch acts in training mode only; the RL policy stays in eval mode).
    State-dict keys are unchanged (the wrapper's hooks strip its prefix)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing,
                                                                             checkpoint_wrapper)
    layers = set(decoder_layers(module))
    apply_activation_checkpointing(
        module, check_fn=lambda m: m in layers,
        checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_fn=_recompute_in_backward))


def shard(module: torch.nn.Module, bf16: bool) -> torch.nn.Module:
    """`module` sharded in place over the default process group: each decoder layer, then the root. -> module"""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for layer in decoder_layers(module):
        fully_shard(layer, mp_policy=policy)
    # the root reshards after every forward too (FSDP2 keeps a root's weights gathered until the backward by
    # default): a no-grad forward (old log-probs, the sync's probe) would otherwise leave them whole, and the
    # sync's fingerprint of this rank's weights would see a different tensor than after the backward
    fully_shard(module, mp_policy=policy, reshard_after_forward=True)
    return module


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: torch.nn.Module) -> dict:
    """The whole model's state dict on rank 0, on CPU ({} on the other ranks); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_state(path, model: torch.nn.Module, optimizer) -> None:
    """This rank's shards of the model and optimizer into `path` (a torch.distributed.checkpoint folder; rank 0
    also writes its metadata). Every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path))


def load_state(path, model: torch.nn.Module, optimizer) -> None:
    """The shards `save_state` wrote, into this rank's model and optimizer (resharded if the rank count changed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
