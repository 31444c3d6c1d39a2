"""Policy-selection metrics once true (on-policy) values exist, from SCOPE-RL's OffPolicySelection."""
from __future__ import annotations

import warnings

import numpy as np

from .encoding import LoggedTokens
from .estimators import num, prepare, scope

TOPK_METRICS = {"best_at_k": "best", "worst_at_k": "worst", "mean_at_k": "mean",
                "std_at_k": "std", "safety_violation_rate_at_k": "safety_violation_rate"}


def _topk_block(metric_dict: dict, top_k: int) -> dict:
    """SCOPE-RL's (max_topk, 1) arrays -> {"k": value} dicts, k 1-based; Sharpe from k = 2."""
    out = {ours: {str(k + 1): num(metric_dict[theirs][k, 0]) for k in range(top_k)}
           for ours, theirs in TOPK_METRICS.items()}
    out["sharpe_ratio_at_k"] = {str(k + 1): num(metric_dict["sharpe_ratio"][k, 0])
                                for k in range(1, top_k)}
    return out


def _ranking_block(sel: dict, true_values: dict) -> dict:
    """regret@1, MSE, nMSE and Spearman from select_by_policy_value(return_metrics=True)."""
    truth = np.array(list(true_values.values()))
    mse = float(sel["mean_squared_error"])
    var = float(np.var(truth))  # population variance of the true values across candidates
    rank_corr = sel["rank_correlation"]
    return {
        "regret_at_1": num(sel["regret"][0]),
        "mse": num(mse),
        "nmse": num(mse / var) if var > 0 else None,
        "rank_correlation": num(rank_corr[0]),
        "rank_correlation_pvalue": num(rank_corr[1]),
        "estimated_ranking": list(sel["estimated_ranking"]),
    }


def selection_metrics(logged: LoggedTokens, candidate_logprobs: dict[str, list[np.ndarray]],
                      true_returns: dict[str, np.ndarray], estimators: list[str], top_k: int,
                      candidate_states: dict[str, list[np.ndarray]] | None = None,
                      seed: int = 0, q_form: str = "state_baseline") -> dict:
    """Selection quality of each estimator against the true values (per estimator dict).

    true_returns[c] are candidate c's on-policy returns (its true value is their mean); they go to
    SCOPE-RL as `on_policy_policy_value`. Per estimator:
      sharpe_ratio_at_k {"2".."K"}, best/worst/mean/std/safety_violation_rate_at_k {"1".."K"}
      (SCOPE-RL's obtain_topk_policy_value_selected_by_standard_ope), regret_at_1, mse,
      rank_correlation (Spearman, SCOPE-RL's select_by_policy_value(return_metrics=True)),
      nmse, estimated_ranking, n_candidates, top_k, safety_threshold, behavior_value.
    * Safety threshold = the behaviour policy's value (mean logged reward): a top-k policy is a
      violation when its true value is below what is already deployed.
    * nMSE = SCOPE-RL's MSE (mean over candidates of (estimate − true)², not normalised there)
      divided by the population variance of the true values across candidates (None if 0).
    * K is clipped to the number of candidates an estimator covers (DM/DR/SNDR cover only the
      candidates with state features); an estimator covering no candidate is absent.
      NaN/inf become None so the dict is valid JSON. seed / q_form: as in `estimate`.
    """
    missing = sorted(set(candidate_logprobs) - set(true_returns))
    if missing:
        raise ValueError(f"no true returns for candidates {missing}")
    on_policy = {c: np.asarray(true_returns[c], dtype=np.float64).reshape(-1)
                 for c in candidate_logprobs}
    ope, input_dict, groups = prepare(logged, candidate_logprobs, estimators,
                                      candidate_states=candidate_states, seed=seed,
                                      on_policy_values=on_policy, q_form=q_form)
    ops = scope().OffPolicySelection(ope=ope)
    threshold = float(logged.behavior_value)
    out = {}
    for ests, names in groups:
        sub = {n: input_dict[n] for n in names}
        k_max = min(int(top_k), len(names))
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # std@1 (ddof=1) is NaN by definition
            topk = ops.obtain_topk_policy_value_selected_by_standard_ope(
                sub, compared_estimators=ests, max_topk=k_max, return_safety_violation_rate=True,
                safety_threshold=threshold)
            sel = ops.select_by_policy_value(sub, compared_estimators=ests, return_metrics=True,
                                             top_k_in_eval_metrics=1, safety_threshold=threshold)
        true_values = {n: float(on_policy[n].mean()) for n in names}
        for est in ests:
            out[est] = {**_topk_block(topk[est], k_max), **_ranking_block(sel[est], true_values),
                        "n_candidates": len(names), "top_k": k_max,
                        "safety_threshold": threshold, "behavior_value": threshold}
    return out
