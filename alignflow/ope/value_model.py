"""Cross-fitted value model for DM / DR / SNDR in the two-action encoding.

ALGORITHMS.md asks for Q̂(s_t, a) for both encoded actions as an expected return-to-go (gamma 1,
the only reward is the verifier reward on the last token). Our adaptation:

* V̂(s) is a ridge regression (sklearn ``StandardScaler`` + ``Ridge``) of the response's final reward
  on the candidate's state features at every position t = 0..T_i of that response. Ridge rather than
  logistic regression: rewards need not be binary, it is closed-form (no convergence issues, ~ms
  for 10^5 rows) and it cannot fail on a fold whose rewards are all equal. Each response's rows
  are weighted 1/(T_i + 1), so every response counts once whatever its length. Predictions are
  clipped to the observed reward range.
* Cross-fitting: responses are split at random into 2 folds (seeded); V̂ fitted on one fold predicts
  the other, so no response's Q̂ has seen its own reward (DR's correction term stays honest).
* ``q_form="next_state"`` (ALGORITHMS.md's suggestion; biased, see below): Q̂(s_t, logged token) = V̂(s_{t+1})
  and Q̂(s_t, other token) = V̂(s_t): taking the logged token leads to the next logged state; "any
  other token" is approximated by the value before deciding.
* ``q_form="state_baseline"`` (our default): Q̂(s_t, ·) = V̂(s_t) for both actions (an
  action-independent baseline, so DR's control variate has zero mean and DR stays unbiased).
* Padding steps get Q̂ = 0 (nothing is left to earn after the last token).

Caveats, measured: V̂ is fitted on behaviour-policy data, so it estimates the behaviour policy's
value from the candidate's features (no importance weighting, which would be too noisy on token
sequences). DM is therefore pulled towards the behaviour value. With "next_state", DR's control
variate does NOT have zero mean: the encoded Σ_a π_e(a|s_t) Q̂(s_t, a) uses the logged token's π_e
and V̂(s_t) for all unlogged tokens, which is not E_{a~π_b}[ρ_t Q̂(s_t, a_t)]. On a 3-token task
where the reward depends on the tokens (true value 0.343, behaviour 0.125) DR/SNDR averaged 0.234
over 20 seeds (TIS 0.340). "state_baseline" is exactly unbiased for any V̂, because E_b[ρ_t | s_t] = 1:
DR then averaged 0.340 with a smaller spread than TIS (0.015 vs 0.020), while its DM is just the
mean V̂(s_0). Use "state_baseline" for DR/SNDR when ranking candidates whose values differ.
"""
from __future__ import annotations

import numpy as np

from .encoding import LoggedTokens


def check_states(logged: LoggedTokens, name: str, states: list[np.ndarray]) -> list[np.ndarray]:
    """Validate a candidate's (T_i + 1, S) state features against the logged tokens."""
    if len(states) != logged.n:
        raise ValueError(f"candidate {name!r}: {len(states)} state arrays, logged data has {logged.n}")
    out, dim = [], None
    for i, (s, t_i) in enumerate(zip(states, logged.lengths)):
        s = np.asarray(s, dtype=np.float64)
        if s.ndim != 2 or s.shape[0] != t_i + 1 or (dim is not None and s.shape[1] != dim):
            raise ValueError(f"candidate {name!r}, response {i}: states shape {s.shape}, "
                             f"expected ({t_i + 1}, {dim or 'S'})")
        if not np.isfinite(s).all():
            raise ValueError(f"candidate {name!r}, response {i}: non-finite state features")
        dim = s.shape[1]
        out.append(s)
    return out


def cross_fitted_values(logged: LoggedTokens, states: list[np.ndarray], *, n_folds: int = 2,
                        seed: int = 0, ridge_alpha: float = 1.0) -> np.ndarray:
    """V̂ at every state row (concatenated over responses), each predicted out-of-fold."""
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows_per = logged.lengths + 1
    traj = np.repeat(np.arange(logged.n), rows_per)
    x = np.concatenate(states)
    y = logged.rewards[traj]
    weight = (1.0 / rows_per)[traj]
    fold_of = np.empty(logged.n, dtype=np.int64)
    fold_of[np.random.default_rng(seed).permutation(logged.n)] = np.arange(logged.n) % n_folds
    row_fold = fold_of[traj]

    values = np.empty(x.shape[0])
    for k in range(n_folds):
        test, train = row_fold == k, row_fold != k
        if not test.any():
            continue
        if not train.any() or np.ptp(y[train]) == 0:
            # Too few responses to hold any out, or nothing to learn: the (training) mean reward.
            values[test] = y[train].mean() if train.any() else logged.behavior_value
            continue
        model = make_pipeline(StandardScaler(), Ridge(alpha=ridge_alpha))
        model.fit(x[train], y[train], ridge__sample_weight=weight[train])
        values[test] = model.predict(x[test])
    return np.clip(values, logged.rewards.min(), logged.rewards.max())


Q_FORMS = ("next_state", "state_baseline")


def q_hat_two_action(logged: LoggedTokens, values: np.ndarray,
                     q_form: str = "state_baseline") -> np.ndarray:
    """(N*T, 2) Q̂ from per-row V̂, padding 0.

    next_state: column 0 (logged token) = V̂(s_{t+1}), column 1 (other) = V̂(s_t).
    state_baseline: both columns V̂(s_t).
    """
    if q_form not in Q_FORMS:
        raise ValueError(f"q_form must be one of {Q_FORMS}, got {q_form!r}")
    starts = np.concatenate([[0], np.cumsum(logged.lengths + 1)[:-1]])
    idx = starts[:, None] + np.arange(logged.max_len)[None, :]
    mask = logged.mask()
    q = np.zeros((logged.n, logged.max_len, 2))
    q[mask, 0] = values[idx[mask] + (1 if q_form == "next_state" else 0)]
    q[mask, 1] = values[idx[mask]]
    return q.reshape(-1, 2)


def fit_q_hat(logged: LoggedTokens, states: list[np.ndarray], *, seed: int = 0,
              name: str = "candidate", q_form: str = "state_baseline") -> np.ndarray:
    """Cross-fitted Q̂ (return-to-go) of one candidate in the two-action encoding."""
    states = check_states(logged, name, states)
    return q_hat_two_action(logged, cross_fitted_values(logged, states, seed=seed), q_form)
