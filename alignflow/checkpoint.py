"""Resumable training state, written atomically where DVC does not delete it before a stage re-runs.

Layout: <dir>/step-<N>/{model.safetensors, state.pt}; <dir>/latest names the newest complete one. A
checkpoint is written to a temporary folder and renamed into place, then `latest` is replaced
atomically, so a kill at any moment leaves the previous checkpoint usable. Loading uses safetensors for
weights and `torch.load(weights_only=True)` for the rest: no pickle of arbitrary objects.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model


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
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:07d}"
    tmp = ckpt_dir / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # save_model drops the duplicate names of shared tensors (tied embeddings: lm_head.weight is embed_tokens.weight;
    # save_file would refuse them with "tensors share memory"); load_model restores them into the same object
    save_model(model, str(tmp / "model.safetensors"), force_contiguous=True)
    torch.save({"step": step, "optimizer": optimizer.state_dict(),
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
    """Restore the newest complete checkpoint into the given objects; returns its state (step, extra) or None."""
    pointer = ckpt_dir / "latest"
    if not pointer.exists():
        return None
    path = ckpt_dir / pointer.read_text().strip()
    load_model(model, str(path / "model.safetensors"), strict=True)
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state


def clear(ckpt_dir: Path) -> None:
    shutil.rmtree(ckpt_dir, ignore_errors=True)
