"""Token-level logs -> SCOPE-RL's discrete-action inputs (the two-action encoding).

A vocabulary-sized action distribution per token is infeasible, so each decision is encoded with two
actions (ALGORITHMS.md "Off-policy evaluation", RECIPES.md §7):

* action 0 = "the token that was logged" (always the logged action), action 1 = "any other token";
* ``pscore = π_b(logged token)``, evaluation distribution ``[π_e(logged token), 1 − π_e(logged token)]``.

That reproduces the per-decision and trajectory-wise importance weights exactly. Responses are
padded to the longest one with ``pscore = 1``, ``π_e = 1`` and reward 0, so padding leaves every
weight unchanged; the verifier reward sits on the last real token, where ``done = terminal = 1``.
The OPE object must be built with ``disable_reward_after_done=False``: the default zeroes exactly
the reward on the ``done`` step.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

BEHAVIOUR_NAME = "behaviour"
# exp(x) underflows to 0 in float64 below about -745. SCOPE-RL multiplies raw probabilities (cumprod
# of pscore and of π_e separately), so a response whose summed log-prob is below this gives 0/0.
UNDERFLOW_LOGP = -700.0


@dataclass
class LoggedTokens:
    """Logged responses of the behaviour policy.

    behaviour_logprobs: per response, the log-prob (float64, shape (T_i,)) of each generated token
        under the distribution actually sampled from (temperature 1, top_k=0).
    rewards: (N,) verifier reward of each response.
    """

    behaviour_logprobs: list[np.ndarray]
    rewards: np.ndarray

    def __post_init__(self) -> None:
        self.behaviour_logprobs = [np.asarray(lp, dtype=np.float64).reshape(-1)
                                   for lp in self.behaviour_logprobs]
        self.rewards = np.asarray(self.rewards, dtype=np.float64).reshape(-1)
        if len(self.behaviour_logprobs) != self.rewards.shape[0]:
            raise ValueError(f"{len(self.behaviour_logprobs)} log-prob arrays but "
                             f"{self.rewards.shape[0]} rewards")
        if self.n == 0:
            raise ValueError("no logged responses")
        if (self.lengths < 1).any():
            raise ValueError("every logged response needs at least one token")
        flat = np.concatenate(self.behaviour_logprobs)
        # A -inf behaviour log-prob means the token could not have been sampled: the logs are wrong.
        if not np.isfinite(flat).all():
            raise ValueError("behaviour log-probs must be finite")
        if not np.isfinite(self.rewards).all():
            raise ValueError("rewards must be finite")

    @property
    def n(self) -> int:
        return len(self.behaviour_logprobs)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([lp.shape[0] for lp in self.behaviour_logprobs], dtype=np.int64)

    @property
    def max_len(self) -> int:
        return int(self.lengths.max())

    @property
    def behavior_value(self) -> float:
        """Mean logged reward: the behaviour policy's value (gamma 1, one reward per response)."""
        return float(self.rewards.mean())

    def mask(self) -> np.ndarray:
        """(N, max_len) bool, True on real tokens."""
        return np.arange(self.max_len)[None, :] < self.lengths[:, None]


def pad(arrays: list[np.ndarray], lengths: np.ndarray, width: int, fill: float) -> np.ndarray:
    """Stack ragged 1-d arrays into (N, width), `fill` after each array's end."""
    out = np.full((len(arrays), width), fill, dtype=np.float64)
    mask = np.arange(width)[None, :] < lengths[:, None]
    out[mask] = np.concatenate(arrays)  # boolean assignment is row-major, like the concatenation
    return out


def check_candidate(logged: LoggedTokens, name: str, logprobs: list[np.ndarray]) -> list[np.ndarray]:
    """Validate one candidate's teacher-forced log-probs against the logged tokens."""
    if len(logprobs) != logged.n:
        raise ValueError(f"candidate {name!r}: {len(logprobs)} responses, logged data has {logged.n}")
    out = []
    for i, (lp, ref) in enumerate(zip(logprobs, logged.behaviour_logprobs)):
        lp = np.asarray(lp, dtype=np.float64).reshape(-1)
        if lp.shape != ref.shape:
            raise ValueError(f"candidate {name!r}, response {i}: shape {lp.shape}, logged {ref.shape}")
        if np.isnan(lp).any():
            raise ValueError(f"candidate {name!r}, response {i}: NaN log-prob")
        out.append(lp)
    return out


def trajectory_log_weights(logged: LoggedTokens, logprobs: list[np.ndarray]) -> np.ndarray:
    """(N,) log of the trajectory-wise importance weight Σ_t [log π_e − log π_b]."""
    return np.array([float(np.sum(e - b)) for e, b in zip(logprobs, logged.behaviour_logprobs)])


def position_features(logged: LoggedTokens) -> np.ndarray:
    """(N*T, 2) candidate-independent state: relative position and a real-token flag.

    The basic (non-marginal) SCOPE-RL estimators never read `state`; it is there because the logged
    dataset must declare a state and its dimension.
    """
    t = np.broadcast_to(np.arange(logged.max_len, dtype=np.float64), (logged.n, logged.max_len))
    return np.stack([t / logged.max_len, logged.mask().astype(np.float64)], axis=-1).reshape(-1, 2)


def logged_dataset(logged: LoggedTokens, behavior_policy: str = BEHAVIOUR_NAME) -> dict:
    """SCOPE-RL logged dataset (flat, trajectory-major arrays of length N * max_len)."""
    n, width, lengths = logged.n, logged.max_len, logged.lengths
    rows = np.arange(n)
    reward = np.zeros((n, width))
    reward[rows, lengths - 1] = logged.rewards       # the verifier reward on the last real token
    done = np.zeros((n, width))
    done[rows, lengths - 1] = 1.0
    # Padding log-prob 0 -> pscore 1, so padding multiplies no weight.
    pscore = np.exp(pad(logged.behaviour_logprobs, lengths, width, 0.0))
    state = position_features(logged)
    return dict(
        size=n * width, n_trajectories=n, step_per_trajectory=width,
        action_type="discrete", n_actions=2, action_dim=None, action_keys=None, action_meaning=None,
        state_dim=state.shape[1], state_keys=None, state=state,
        action=np.zeros(n * width, dtype=np.int64), reward=reward.reshape(-1),
        done=done.reshape(-1), terminal=done.reshape(-1).copy(),
        pscore=np.clip(pscore.reshape(-1), 0.0, 1.0),
        info={}, behavior_policy=behavior_policy, dataset_id=0,
    )


def encode_two_action(logged: LoggedTokens, candidate_logprobs: dict[str, list[np.ndarray]], *,
                      q_hat: dict[str, np.ndarray] | None = None,
                      on_policy_values: dict[str, np.ndarray] | None = None,
                      behavior_policy: str = BEHAVIOUR_NAME) -> tuple[dict, dict]:
    """Two-action encoding of the logs and every candidate (candidates in sorted-name order).

    q_hat: optional per-candidate (N*T, 2) Q̂ (return-to-go) for DM/DR; None elsewhere.
    on_policy_values: optional per-candidate on-policy returns, needed only by OffPolicySelection.
    Returns (logged_dataset, input_dict) as OffPolicyEvaluation expects them.
    """
    q_hat, on_policy_values = q_hat or {}, on_policy_values or {}
    dataset = logged_dataset(logged, behavior_policy)
    input_dict = {}
    for name in sorted(candidate_logprobs):
        lps = check_candidate(logged, name, candidate_logprobs[name])
        warn_if_underflow(logged, name, lps)
        # Log-probs a hair above 0 (low-precision rounding) would give π_e > 1, which SCOPE-RL rejects.
        pi_e = np.exp(np.minimum(pad(lps, logged.lengths, logged.max_len, 0.0), 0.0)).reshape(-1)
        truth = on_policy_values.get(name)
        input_dict[name] = dict(
            evaluation_policy_action=None,
            evaluation_policy_action_dist=np.stack([pi_e, 1.0 - pi_e], axis=1),
            state_action_value_prediction=q_hat.get(name),
            initial_state_value_prediction=None,
            state_action_marginal_importance_weight=None, state_marginal_importance_weight=None,
            on_policy_policy_value=None if truth is None else np.asarray(truth, dtype=np.float64),
            gamma=1.0, behavior_policy=behavior_policy, evaluation_policy=name, dataset_id=0,
        )
    return dataset, input_dict


def warn_if_underflow(logged: LoggedTokens, name: str, logprobs: list[np.ndarray]) -> None:
    """Warn when SCOPE-RL's product of raw probabilities will underflow to 0 for some response."""
    worst_b = min(float(lp.sum()) for lp in logged.behaviour_logprobs)
    worst_e = min(float(lp.sum()) for lp in logprobs)
    if min(worst_b, worst_e) < UNDERFLOW_LOGP:
        warnings.warn(f"candidate {name!r}: a response's summed log-prob is {min(worst_b, worst_e):.0f} "
                      f"(< {UNDERFLOW_LOGP:.0f}); SCOPE-RL's probability products underflow and its "
                      "IS weights become NaN. Shorten responses or evaluate on a prefix.",
                      RuntimeWarning, stacklevel=3)
