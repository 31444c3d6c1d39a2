"""VSDR adapted to LLM policies (ALGORITHMS.md, "VSDR adapted to LLM policies"; our adaptation).

Score per candidate: VSDR = z(sim value) − α·z(OOD score), z-scores across candidates. "sim" is
the candidate's value on the labelled synthetic set (or its OPE estimate); the OOD score says how
foreign the unlabelled real prompts are to the policy (higher = more foreign = worse).
"""
from __future__ import annotations

import math
import warnings

import numpy as np


def zscores(values: dict[str, float]) -> dict[str, float]:
    """(x − mean) / std across candidates (population std, ddof=0); all 0 when std is 0."""
    names = list(values)
    x = np.array([float(values[n]) for n in names])
    std = x.std()
    z = (x - x.mean()) / std if std > 0 else np.zeros_like(x)
    return {n: float(v) for n, v in zip(names, z)}


def _same_keys(*dicts: dict) -> list[str]:
    keys = set(dicts[0])
    for d in dicts[1:]:
        if set(d) != keys:
            raise ValueError(f"candidate sets differ: {sorted(keys ^ set(d))}")
    return sorted(keys)


def vsdr_scores(sim_values: dict[str, float], ood_scores: dict[str, float],
                alpha: float = 1.0) -> dict[str, float]:
    """VSDR = z(sim) − alpha · z(ood) per candidate (higher is better)."""
    names = _same_keys(sim_values, ood_scores)
    z_sim = zscores({n: sim_values[n] for n in names})
    z_ood = zscores({n: ood_scores[n] for n in names})
    return {n: z_sim[n] - alpha * z_ood[n] for n in names}


def _top1(scores: dict[str, float]) -> str:
    # Highest score; ties to the alphabetically first name, as choose() does.
    return min(scores, key=lambda n: (-scores[n], n))


def _spearman(scores: dict[str, float], true_values: dict[str, float]) -> float | None:
    from scipy.stats import spearmanr  # lazy: keeps `import alignflow.ope` light

    names = sorted(scores)
    with warnings.catch_warnings():  # constant input warns and returns NaN; we report None
        warnings.simplefilter("ignore")
        rho = spearmanr([scores[n] for n in names], [true_values[n] for n in names]).statistic
    return float(rho) if math.isfinite(rho) else None  # constant input -> undefined


def vsdr_report(sim_values: dict[str, float], ood_scores: dict[str, float],
                true_values: dict[str, float], alpha: float = 1.0) -> dict:
    """Does VSDR rank better than sim-only or OOD-only? Spearman vs true values, and regret@1.

    sim_only ranks by the sim value, ood_only by −OOD score, vsdr by `vsdr_scores`.
    regret@1 = max(true) − true[top-1 of that ranking]. Spearman is None when undefined.
    """
    names = _same_keys(sim_values, ood_scores, true_values)
    rankings = {
        "vsdr": vsdr_scores(sim_values, ood_scores, alpha),
        "sim_only": {n: float(sim_values[n]) for n in names},
        "ood_only": {n: -float(ood_scores[n]) for n in names},
    }
    best = max(float(true_values[n]) for n in names)
    return {
        "spearman": {k: _spearman(s, true_values) for k, s in rankings.items()},
        "regret_at_1": {k: best - float(true_values[_top1(s)]) for k, s in rankings.items()},
        "top_1": {k: _top1(s) for k, s in rankings.items()},
        "alpha": float(alpha),
    }
