"""Which parameters an RL run changed ("Reinforcement Learning Finetunes Small Subnetworks in Large Language Models",
arXiv:2505.11711), and training only those.

An element counts as changed when its bf16 value differs from the SFT model's (alignflow.steps.policies.changed_mask,
what the evaluate stage's `changed_share_vs_sft` counts): the paper compares in bf16, below which fp32 optimiser
noise sits. Alongside, `fp32_changed_share` counts any fp32 change and `abs_gt_1e-5_share` the paper's tolerance.

A run's changed set is kept as one packed bit array over the model's named parameters in order (np.packbits), so
sets of different runs of the same model compare bit for bit (Jaccard) and one of them can mask the gradients of
another run (`apply_grad_mask`: with AdamW at weight decay 0 a parameter whose gradient is always 0 never moves).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from alignflow.steps.policies import changed_mask


def snapshot(model) -> dict[str, torch.Tensor]:
    """A detached copy of the parameters (the SFT weights the run starts from)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@torch.no_grad()
def changed(start: dict[str, torch.Tensor], model) -> tuple[dict, np.ndarray]:
    """Per parameter matrix the share of elements changed beyond bf16 rounding, the whole model's shares (bf16,
    any fp32 change, |delta| > 1e-5), and the packed changed set. -> (figures, packed bits)"""
    per_matrix, bits, totals = {}, [], {"bf16": 0, "fp32": 0, "tol": 0, "n": 0}
    for name, p in model.named_parameters():
        ref = start[name]
        mask = changed_mask(ref, p)
        n = p.numel()
        k = int(mask.sum())
        per_matrix[name] = k / n
        totals["bf16"] += k
        totals["fp32"] += int((ref != p).sum())
        totals["tol"] += int(((ref.float() - p.float()).abs() > 1e-5).sum())
        totals["n"] += n
        bits.append(mask.flatten().cpu().numpy())
    figures = {"changed_share": totals["bf16"] / totals["n"], "fp32_changed_share": totals["fp32"] / totals["n"],
               "abs_gt_1e-5_share": totals["tol"] / totals["n"], "parameters": totals["n"],
               "per_matrix": per_matrix}
    return figures, np.packbits(np.concatenate(bits))


def save_mask(path: str | Path, packed: np.ndarray) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.save(path, packed)


def load_mask(path: str | Path) -> np.ndarray:
    return np.load(path)


def apply_grad_mask(model, packed: np.ndarray) -> int:
    """Zero the gradient of every element outside the packed changed set (a hook per parameter). -> elements kept"""
    flat = np.unpackbits(packed)
    offset, kept = 0, 0
    for _, p in model.named_parameters():
        n = p.numel()
        mask = torch.from_numpy(flat[offset:offset + n].astype(np.float32)).reshape(p.shape).to(p.device, p.dtype)
        offset += n
        kept += int(mask.sum())
        p.register_hook(lambda grad, m=mask: grad * m)
    if offset > len(flat) or len(flat) - offset >= 8:
        raise ValueError(f"mask of {len(flat)} bits does not fit a model of {offset} parameters")
    return kept


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def popcount(packed: np.ndarray) -> int:
    """Set bits of a packed uint8 array (numpy >= 2's bitwise_count where there, else a lookup table)."""
    if hasattr(np, "bitwise_count"):
        return int(np.bitwise_count(packed).sum(dtype=np.int64))
    return int(_POPCOUNT[packed].sum())


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A & B| / |A | B| of two packed sets (1.0 for two empty sets)."""
    union = popcount(a | b)
    return popcount(a & b) / union if union else 1.0


def chance_jaccard(p: float, q: float) -> float:
    """Expected Jaccard of two independent random sets with element densities p and q: pq / (p + q - pq)."""
    union = p + q - p * q
    return p * q / union if union else 1.0
