"""Resumable training state, written atomically where DVC does not delete it before a stage re-runs.

Layout: <dir>/step-<N>/{model.safetensors, state.pt}; <dir>/latest names the newest complete one. Under FSDP
model.safetensors is replaced by sharded/, every rank's shards of the model and optimizer in
torch.distributed.checkpoint's format. A checkpoint is written to a temporary folder and renamed into place, then
`latest` is replaced atomically, so a kill at any moment leaves the previous checkpoint usable. Loading uses
safetensors for weights and `torch.load(weights_only=True)` for the rest: no pickle of arbitrary objects (except
torch.distributed.checkpoint's own .metadata file in a sharded checkpoint, which it unpickles itself).
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from alignflow.train import distributed, sharding


def _rng_state() -> dict:
    py = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]), "python": [py[0], list(py[1]), py[2]]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def save(ckpt_dir: Path, step: int, model, optimizer, scheduler=None, extra: dict | None = None, keep: int = 2) -> Path:
    """Under torchrun every rank calls this: rank 0 alone writes a replicated model (DDP); a sharded one (FSDP) is
    written by every rank, its shards of the model and optimizer through torch.distributed.checkpoint into
    step-N/sharded/, before rank 0 renames the folder into place."""
    sharded = sharding.is_sharded(model)
    final = ckpt_dir / f"step-{step:07d}"
    if not sharded and not distributed.is_main():
        return final
    tmp = ckpt_dir / f".tmp-step-{step:07d}"
    if distributed.is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if sharded:
        distributed.barrier()  # the folder is empty before any rank writes its shards
        sharding.save_state(tmp / "sharded", model, optimizer)   # returns once every rank's shards are written
        if not distributed.is_main():
            return final
    else:
        # save_model drops the duplicate names of shared tensors (tied embeddings: lm_head.weight is
        # embed_tokens.weight; save_file would refuse them with "tensors share memory"); load_model restores them
        save_model(model, str(tmp / "model.safetensors"), force_contiguous=True)
    torch.save({"step": step, "optimizer": None if sharded else optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler else None,
                "rng": _rng_state(), "extra": extra or {}}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = ckpt_dir / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, ckpt_dir / "latest")
    for old in sorted(ckpt_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(ckpt_dir: Path, model, optimizer, scheduler=None) -> dict | None:
    """Restore the newest complete checkpoint into the given objects; returns its state (step, extra) or None.
    A sharded checkpoint loads into a sharded model (every rank reads its shards; every rank must call this)."""
    pointer = ckpt_dir / "latest"
    if not pointer.exists():
        return None
    path = ckpt_dir / pointer.read_text().strip()
    state = torch.load(path / "state.pt", weights_only=True)
    if (path / "sharded").exists():
        sharding.load_state(path / "sharded", model, optimizer)
    else:
        load_model(model, str(path / "model.safetensors"), strict=True)
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state


def clear(ckpt_dir: Path) -> None:
    shutil.rmtree(ckpt_dir, ignore_errors=True)
