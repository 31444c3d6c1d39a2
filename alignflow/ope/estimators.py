"""Off-policy estimates of candidate policies with SCOPE-RL (point estimates + bootstrap CIs)."""
from __future__ import annotations

import contextlib
import functools
import io
import math
from types import SimpleNamespace

import numpy as np

from .encoding import LoggedTokens, check_candidate, encode_two_action, trajectory_log_weights
from .value_model import fit_q_hat

# Our estimator names -> SCOPE-RL 0.2.1 classes in scope_rl.ope.discrete (their estimator_name
# attribute is the same short name, which is how OffPolicyEvaluation keys its results).
ESTIMATOR_CLASSES = {
    "dm": "DirectMethod",
    "tis": "TrajectoryWiseImportanceSampling",
    "pdis": "PerDecisionImportanceSampling",
    "sntis": "SelfNormalizedTIS",
    "snpdis": "SelfNormalizedPDIS",
    "dr": "DoublyRobust",
    "sndr": "SelfNormalizedDR",
}
# Estimators that need Q̂, hence state features of the candidate.
MODEL_BASED = frozenset({"dm", "dr", "sndr"})


@functools.cache
def scope() -> SimpleNamespace:
    """Import SCOPE-RL once, lazily (2-3 s), hiding gym 0.26's NumPy-2 notice.

    The notice is a print to stderr, not a warning, so only redirecting stderr silences it.
    """
    with contextlib.redirect_stderr(io.StringIO()):
        from scope_rl.ope import OffPolicyEvaluation, OffPolicySelection
        from scope_rl.ope import discrete
    return SimpleNamespace(OffPolicyEvaluation=OffPolicyEvaluation,
                           OffPolicySelection=OffPolicySelection, discrete=discrete)


def num(x) -> float | None:
    """Plain Python float for JSON; NaN and ±inf become None."""
    x = float(x)
    return x if math.isfinite(x) else None


def check_estimators(estimators: list[str]) -> list[str]:
    unknown = [e for e in estimators if e not in ESTIMATOR_CLASSES]
    if unknown or not estimators:
        raise ValueError(f"unknown or no estimators {unknown}; choose from {sorted(ESTIMATOR_CLASSES)}")
    return list(dict.fromkeys(estimators))  # de-duplicated, order kept


def make_ope(dataset: dict, estimators: list[str]):
    """OffPolicyEvaluation over the encoded logs; keeps the final-token reward (see encoding.py)."""
    sc = scope()
    objs = [getattr(sc.discrete, ESTIMATOR_CLASSES[e])() for e in estimators]
    return sc.OffPolicyEvaluation(logged_dataset=dataset, ope_estimators=objs,
                                  disable_reward_after_done=False)


def kish_ess(log_weights: np.ndarray) -> float:
    """Kish effective sample size (Σw)² / Σw², computed in log space (weights over/underflow)."""
    lw = np.asarray(log_weights, dtype=np.float64)
    if lw.size == 0 or not np.isfinite(lw).any():
        return 0.0
    top = np.max(lw[np.isfinite(lw)])
    w = np.exp(lw - top)  # rescaling by a constant leaves the ratio unchanged
    return float(w.sum() ** 2 / np.sum(w ** 2))


def prepare(logged: LoggedTokens, candidate_logprobs: dict, estimators: list[str], *,
            candidate_states: dict | None = None, seed: int = 0,
            on_policy_values: dict | None = None, q_form: str = "state_baseline"):
    """Encode everything once. Returns (ope, input_dict, groups).

    groups: list of (estimator names, candidate names) that can be run together: IS-family
    estimators over every candidate, DM/DR/SNDR over the candidates that have state features
    (the others are skipped for those estimators; there is no sound Q̂ without features).
    """
    estimators = check_estimators(estimators)
    states = candidate_states or {}
    unknown = sorted(set(states) - set(candidate_logprobs))
    if unknown:
        raise ValueError(f"state features for unknown candidates {unknown}")
    model_based = [e for e in estimators if e in MODEL_BASED]
    q_hat = {}
    if model_based:
        q_hat = {name: fit_q_hat(logged, states[name], seed=seed, name=name, q_form=q_form)
                 for name in sorted(states)}
    dataset, input_dict = encode_two_action(logged, candidate_logprobs, q_hat=q_hat,
                                            on_policy_values=on_policy_values)
    groups = []
    is_family = [e for e in estimators if e not in MODEL_BASED]
    if is_family:
        groups.append((is_family, sorted(input_dict)))
    if model_based and q_hat:
        groups.append((model_based, sorted(q_hat)))
    return make_ope(dataset, estimators), input_dict, groups


def _ci_bounds(ci: dict) -> tuple[float, float]:
    # SCOPE-RL keys them f"{100 * (1. - alpha)}% CI (lower)"; match the suffix, not the float text.
    low = next(v for k, v in ci.items() if k.endswith("CI (lower)"))
    high = next(v for k, v in ci.items() if k.endswith("CI (upper)"))
    return low, high


def _run_group(ope, input_dict: dict, estimators: list[str], names: list[str], *,
               n_bootstrap: int, alpha: float, seed: int) -> dict:
    """Point estimates and bootstrap CIs of `estimators` for candidates `names`."""
    sub = {n: input_dict[n] for n in names}
    points = ope.estimate_policy_value(sub, compared_estimators=estimators)
    # One random_state for every candidate: common resamples make CIs comparable across candidates.
    cis = ope.estimate_intervals(sub, compared_estimators=estimators, alpha=float(alpha),
                                 ci="bootstrap", n_bootstrap_samples=int(n_bootstrap),
                                 random_state=int(seed))
    out = {}
    for est in estimators:
        out[est] = {}
        for n in names:
            low, high = _ci_bounds(cis[n][est])
            out[est][n] = {"value": num(points[n][est]), "ci_low": num(low), "ci_high": num(high)}
    return out


def estimate(logged: LoggedTokens, candidate_logprobs: dict[str, list[np.ndarray]],
             estimators: list[str], n_bootstrap: int = 200, alpha: float = 0.05, seed: int = 0,
             candidate_states: dict[str, list[np.ndarray]] | None = None, *,
             q_form: str = "state_baseline") -> dict:
    """OPE of every candidate with every estimator.

    Returns {estimator: {"estimates": {candidate: {"value", "ci_low", "ci_high"}},
                         "ess": median Kish ESS over the estimator's candidates,
                         "ess_per_candidate": {candidate: ESS},
                         "skipped": [candidates without state features (DM/DR/SNDR only)]}}.
    ESS is that of the trajectory-wise importance weights (out of N logged responses). All numbers
    are plain floats; a non-finite estimate (e.g. underflowed weights) is None.
    q_form: how DM/DR/SNDR's Q̂ is built from V̂ (see value_model.py; "state_baseline" keeps DR
    unbiased, the default "next_state" follows ALGORITHMS.md and biases DR towards behaviour).
    """
    ope, input_dict, groups = prepare(logged, candidate_logprobs, estimators,
                                      candidate_states=candidate_states, seed=seed, q_form=q_form)
    ess = {n: kish_ess(trajectory_log_weights(logged, check_candidate(logged, n, candidate_logprobs[n])))
           for n in input_dict}
    results = {}
    for ests, names in groups:
        values = _run_group(ope, input_dict, ests, names, n_bootstrap=n_bootstrap, alpha=alpha,
                            seed=seed)
        for est in ests:
            results[est] = {"estimates": values[est],
                            "ess": float(np.median([ess[n] for n in names])),
                            "ess_per_candidate": {n: ess[n] for n in names},
                            "skipped": sorted(set(input_dict) - set(names))}
    for est in check_estimators(estimators):  # model-based estimators with no candidate states
        results.setdefault(est, {"estimates": {}, "ess": None, "ess_per_candidate": {},
                                 "skipped": sorted(input_dict)})
    return {est: results[est] for est in check_estimators(estimators)}
