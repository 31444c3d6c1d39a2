"""Intervals and verdicts of the benchmarks (t quantiles from scipy; the rest in plain Python).

    t_ppf(q, df)                 Student t quantile (fractional df allowed: Welch)
    mean_ci(values)              mean and the half-width of its 95% t-interval
    diff_vs_constant(a, c)       mean(a) - c with its 95% t-interval (a single deterministic baseline, e.g. SFT greedy)
    welch_diff(a, b)             mean(a) - mean(b) with Welch's 95% t-interval (two independent sets of seeds)
    paired_bootstrap(a, b)       mean difference over prompts of two per-prompt score rows, percentile interval
    verdict(lo, hi, direction)   'holds' / 'does not hold' / 'inconclusive'
"""
from __future__ import annotations

import math

PRACTICAL_MARGIN = 0.01   # accuracy: 5 of 500 held-out prompts; an effect whose upper bound is below it is no effect


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t with df degrees of freedom (fractional df: Welch)."""
    from scipy import stats   # in the pinned set (constraints.txt) and on the device image
    return float(stats.t.ppf(q, df))


def _mean_var(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan"))


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its t-interval (nan with one value)."""
    n = len(values)
    mean, var = _mean_var(values)
    if n < 2:
        return mean, float("nan")
    return mean, t_ppf(0.5 + level / 2, n - 1) * math.sqrt(var / n)


def diff_vs_constant(a: list[float], c: float, level: float = 0.95) -> dict:
    """mean(a) - c and its t-interval over a's seeds (the baseline is one deterministic figure, e.g. SFT greedy)."""
    mean, half = mean_ci(a, level)
    return {"diff": mean - c, "lo": mean - c - half, "hi": mean - c + half, "df": len(a) - 1}


def welch_diff(a: list[float], b: list[float], level: float = 0.95) -> dict:
    """mean(a) - mean(b) and Welch's t-interval (unequal variances, Welch-Satterthwaite df)."""
    (ma, va), (mb, vb) = _mean_var(a), _mean_var(b)
    if len(a) < 2 or len(b) < 2:
        return {"diff": ma - mb, "lo": float("nan"), "hi": float("nan"), "df": float("nan")}
    sa, sb = va / len(a), vb / len(b)
    se = math.sqrt(sa + sb)
    if se == 0:
        return {"diff": ma - mb, "lo": ma - mb, "hi": ma - mb, "df": float(len(a) + len(b) - 2)}
    df = (sa + sb) ** 2 / (sa ** 2 / (len(a) - 1) + sb ** 2 / (len(b) - 1))
    half = t_ppf(0.5 + level / 2, df) * se
    return {"diff": ma - mb, "lo": ma - mb - half, "hi": ma - mb + half, "df": df}


def paired_bootstrap(a_rows: list[list[float]], b_rows: list[list[float]], n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Difference of mean per-prompt scores, A minus B, over the same prompts: each side's per-prompt score is its
    mean over its runs (seeds); prompts are resampled with replacement (the same draw for both sides), and the
    percentile interval of the mean difference is returned."""
    import numpy as np
    a, b = np.asarray(a_rows, dtype=float).mean(0), np.asarray(b_rows, dtype=float).mean(0)
    d = a - b
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    tail = (1 - level) / 2
    return {"diff": float(d.mean()), "lo": float(np.quantile(means, tail)), "hi": float(np.quantile(means, 1 - tail)),
            "n_prompts": int(len(d)), "n_boot": n_boot}


DIRECTIONS = ("greater", "not_worse")


def verdict(lo: float, hi: float, direction: str = "greater", margin: float = PRACTICAL_MARGIN) -> str:
    """The interval [lo, hi] of a difference (paper's method minus the baseline) against the paper's claim.
    greater   (the paper says it is better): holds when the interval excludes 0 above; does not hold when it excludes
              0 below or its upper bound is below the practical margin (at best a negligible gain); else inconclusive.
    not_worse (the paper says it matches or beats): holds when the lower bound is above -margin; does not hold when
              the upper bound is below -margin; else inconclusive."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r}; allowed: {DIRECTIONS}")
    if lo != lo or hi != hi:
        return "inconclusive"
    if direction == "greater":
        if lo > 0:
            return "holds"
        return "does not hold" if hi < 0 or hi < margin else "inconclusive"
    if lo > -margin:
        return "holds"
    return "does not hold" if hi < -margin else "inconclusive"
