"""Weight-sync checks that can fail, shared by the rollout engines.

A sync check that compares a model with itself passes whatever happened to the weights. These compare against
things recorded independently at the last sync:

* `SyncRecord.verify` - the engine's sampling path scored a probe sequence; its log-probs must match the trainer's
  within `tolerance` (absolute), and must have moved WITH the trainer since the last sync: a stale engine keeps the
  old log-probs, so its distance to the trainer equals how far the trainer moved. Once the trainer moved more than
  4x the largest engine/trainer difference seen at earlier syncs (the numerical noise between the two code paths),
  the engine must be at least twice as close to the new log-probs as the trainer moved - catching a sync that did
  not take even when the move is below the absolute tolerance.
* `SyncRecord.check_unchanged` - a fingerprint of the trainer's weights taken at the last sync: trainer weights
  that changed since, without a sync, mean the engine samples from weights the loop no longer has.
"""
from __future__ import annotations

import torch


class WeightSyncError(RuntimeError):
    pass


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (FSDP: DTensor) tensor; the tensor itself otherwise."""
    from torch.distributed.tensor import DTensor
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def weights_fingerprint(model) -> torch.Tensor:
    """Per parameter (sum, sum of squares) in float64: a cheap hash that any changed weight changes; of this rank's
    shards when the trainer is sharded (FSDP). -> [n, 2]"""
    with torch.no_grad():
        return torch.stack([torch.stack([p.double().sum(), p.double().square().sum()])
                            for p in map(_local, model.parameters())]).cpu()


def load_weights(engine_model, trainer_model) -> None:
    """The trainer's full weights into an engine's own copy, in the copy's dtypes. A LoRA trainer is merged first;
    a sharded trainer (FSDP: the module at its root, or rl._Scorer whose `policy` is the causal LM) is gathered one
    tensor at a time, cast to the copy's dtype before the all-gather (a 7B policy's bf16 weights: no rank holds
    more than one full fp32 tensor beyond its shards). Every rank must call it for a sharded trainer; a rank that
    keeps no copy passes `engine_model=None`."""
    from torch.distributed.tensor import DTensor
    from alignflow import lora
    trainer = lora.merged(getattr(trainer_model, "policy", trainer_model))
    target = engine_model.state_dict() if engine_model is not None else {}
    with torch.no_grad():
        for name, value in trainer.state_dict().items():
            if isinstance(value, DTensor):
                value = value.to(target[name].dtype if engine_model is not None else value.dtype).full_tensor()
            if engine_model is not None:
                target[name].copy_(value)


class SyncRecord:
    """What an engine was last synced to: the trainer model, its weights' fingerprint, its probe log-probs."""

    def __init__(self, engine_name: str, trainer_model, tolerance: float):
        self.engine_name, self.tolerance = engine_name, tolerance
        self.trainer_probe: torch.Tensor | None = None   # [1, L-1] the trainer's probe log-probs at the last sync
        self.noise = 0.0                                  # largest engine/trainer probe difference at a sync so far
        self.record(trainer_model)

    def record(self, trainer_model, trainer_probe: torch.Tensor | None = None) -> None:
        self.trainer, self.fingerprint = trainer_model, weights_fingerprint(trainer_model)
        if trainer_probe is not None:
            self.trainer_probe = trainer_probe.detach().float().cpu()

    def verify(self, engine_probe: torch.Tensor, trainer_probe: torch.Tensor,
               sampled: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
        """Raise WeightSyncError unless the engine's probe log-probs match the trainer's and moved with it.
        `sampled`: (engine, trainer) log-probs of a sequence the engine's sampling path produced, held to the
        same tolerance (its tokens may change between syncs, so it is not compared with the last sync's)."""
        engine_probe, trainer_probe = engine_probe.detach().float().cpu(), trainer_probe.detach().float().cpu()
        diff = (engine_probe - trainer_probe).abs().max().item()
        if sampled is not None:
            diff = max(diff, (sampled[0].detach().float().cpu() - sampled[1].detach().float().cpu()).abs().max().item())
        if not diff <= self.tolerance:
            raise WeightSyncError(f"{self.engine_name} engine log-probs of the probe differ from the trainer's by "
                                  f"{diff:.2e} (tolerance {self.tolerance:.0e}): the weight sync did not take")
        if self.trainer_probe is not None:
            moved = (trainer_probe - self.trainer_probe).abs().max().item()
            if moved > 4 * max(self.noise, 1e-6) and diff > moved / 2:
                raise WeightSyncError(f"{self.engine_name} engine did not follow the trainer: the trainer's probe "
                                      f"log-probs moved {moved:.2e} since the last sync, the engine is still "
                                      f"{diff:.2e} away: the weight sync did not take")
        self.noise = max(self.noise, diff)
        return diff

    def check_unchanged(self) -> None:
        """Raise WeightSyncError if the trainer's weights changed since the last sync (the engine is stale)."""
        if not torch.equal(weights_fingerprint(self.trainer), self.fingerprint):
            raise WeightSyncError(f"the trainer's weights changed since the last sync to the {self.engine_name} "
                                  f"engine, without a sync: it would sample from stale weights")
