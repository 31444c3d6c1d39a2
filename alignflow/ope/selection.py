"""Choosing a candidate from OPE results, the promotion gate, and SharpeRatio@k."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

RULES = {"estimate": "value", "lower_bound": "ci_low"}


def choose(results: dict, estimator: str, rule: str) -> str:
    """Candidate with the highest point estimate ("estimate") or lower CI bound ("lower_bound").

    `results` is what `estimate` returns. Ties go to the alphabetically first name, so the choice
    is deterministic. Candidates whose number is missing (None/NaN) cannot be chosen.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {sorted(RULES)}, got {rule!r}")
    if estimator not in results:
        raise ValueError(f"estimator {estimator!r} not in results ({sorted(results)})")
    key = RULES[rule]
    scored = [(v[key], name) for name, v in results[estimator]["estimates"].items()
              if v.get(key) is not None and math.isfinite(v[key])]
    if not scored:
        raise ValueError(f"no candidate has a finite {key!r} for estimator {estimator!r}")
    return min(scored, key=lambda s: (-s[0], s[1]))[1]


def promotion_gate(new_estimate: float, current_estimate: float | None, margin: float,
                   candidates: list[float] | None = None, logged_rewards=None) -> tuple[bool, str]:
    """Promote if there is no champion, or the new estimate beats it by more than `margin`; never when the
    choice carries no signal: every logged reward equal (nothing to weight), or every candidate's estimate tied
    (the "champion" is then only the first of equals)."""
    if new_estimate is None or not math.isfinite(new_estimate):
        return False, f"new estimate {new_estimate!r} is not a finite number"
    if logged_rewards is not None and len(logged_rewards) and float(np.ptp(np.asarray(logged_rewards, float))) == 0:
        return False, (f"no signal: every logged reward is {float(np.asarray(logged_rewards, float)[0]):.4f}, so no "
                       "estimate can tell the candidates apart; not promoting (check the rewards)")
    if candidates is not None and len(candidates) > 1 and max(candidates) - min(candidates) <= 1e-12:
        return False, f"no signal: all {len(candidates)} candidates tie at {new_estimate:.4f}; not promoting"
    if current_estimate is None:
        return True, f"no current champion; promoting (estimate {new_estimate:.4f})"
    bar = current_estimate + margin
    if new_estimate > bar:
        return True, (f"new estimate {new_estimate:.4f} > current {current_estimate:.4f} "
                      f"+ margin {margin:.4f}")
    return False, (f"new estimate {new_estimate:.4f} <= current {current_estimate:.4f} "
                   f"+ margin {margin:.4f}")


def decide(own: dict, current: dict | None, select, logged_rewards) -> dict:
    """The ope stage's decision: the champion among the candidates' estimates (`own`, what `estimate` returns
    without the registered champion) by `select` (estimator, rule, margin), then the promotion gate against the
    registered champion's estimate on the same logs (`current`, None when there is none).
    {"champion", "promoted", "reason"}."""
    champion = choose(own, select.estimator, select.rule)
    key = RULES[select.rule]
    estimates = own[select.estimator]["estimates"]
    promoted, reason = promotion_gate(estimates[champion][key], current[key] if current else None, select.margin,
                                      candidates=[e[key] for e in estimates.values()], logged_rewards=logged_rewards)
    return {"champion": champion, "promoted": promoted, "reason": reason}


def _aligned(estimated, true_values) -> tuple[np.ndarray, np.ndarray]:
    """Estimates and true values as aligned arrays (dicts are aligned by `estimated`'s key order)."""
    if isinstance(estimated, Mapping):
        if not isinstance(true_values, Mapping):
            raise TypeError("estimated is a dict, so true_values must be one too")
        missing = sorted(set(estimated) - set(true_values))
        if missing:
            raise ValueError(f"no true value for {missing}")
        keys = list(estimated)
        return (np.array([float(estimated[k]) for k in keys]),
                np.array([float(true_values[k]) for k in keys]))
    est = np.asarray(estimated, dtype=np.float64).reshape(-1)
    true = np.asarray(true_values, dtype=np.float64).reshape(-1)
    if est.shape != true.shape:
        raise ValueError(f"{est.shape[0]} estimates but {true.shape[0]} true values")
    return est, true


def sharpe_ratio_at_k(estimated: Mapping[str, float] | Sequence[float],
                      true_values: Mapping[str, float] | Sequence[float],
                      behavior_value: float, k: int) -> float:
    """SharpeRatio@k as SCOPE-RL 0.2.1 computes it (scope_rl/ope/ops.py).

    Rank candidates by estimate, descending, with SCOPE-RL's own ``np.argsort(est)[::-1]`` (so ties
    are ordered exactly as SCOPE-RL orders them for the same input order); among the top k,
    best@k = max true value and std@k = sample std (ddof=1) of their true values;
    SharpeRatio@k = max(best@k − behavior_value, 0) / std@k.
    NaN at k = 1; with std@k = 0 it is inf (positive numerator) or NaN (zero numerator).
    (SCOPE-RL adds 1e-10 to the behaviour value; that is below any meaningful difference.)
    """
    est, true = _aligned(estimated, true_values)
    if not 1 <= k <= est.shape[0]:
        raise ValueError(f"k must be in 1..{est.shape[0]}, got {k}")
    if k == 1:
        return float("nan")  # sample std of one value is undefined
    top = true[np.argsort(est)[::-1][:k]]
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.clip(top.max() - behavior_value, 0.0, None) / top.std(ddof=1))
