"""alignflow.ope: two-action encoding vs direct importance weights, selection metrics, VSDR, I/O."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from alignflow.ope import (LoggedTokens, choose, encode_two_action, estimate, kish_ess, load_inputs,
                           promotion_gate, save_inputs, selection_metrics, sharpe_ratio_at_k,
                           vsdr_report, vsdr_scores)
from alignflow.ope.encoding import pad
from alignflow.ope.estimators import make_ope, scope

IS_FAMILY = ["tis", "pdis", "sntis", "snpdis"]


def ragged(seed: int = 0, n: int = 60, n_cands: int = 3):
    """Random small ragged logs (lengths 1..7) and candidates that re-weight the logged tokens."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 8, n)
    beh = [np.log(rng.uniform(0.2, 1.0, t)) for t in lengths]
    rewards = rng.integers(0, 2, n).astype(float)
    cands = {f"cand{j}": [np.log(np.clip(np.exp(b) * rng.uniform(0.6, 1.4, b.shape), 1e-6, 1.0))
                          for b in beh] for j in range(n_cands)}
    return LoggedTokens(beh, rewards), cands


def direct_weights(logged: LoggedTokens, cand: list[np.ndarray]) -> np.ndarray:
    """(N, T) per-decision cumulative weights w_{0:t}, straight from the log-probs."""
    diff = pad([e - b for e, b in zip(cand, logged.behaviour_logprobs)], logged.lengths,
               logged.max_len, 0.0)
    return np.exp(np.cumsum(diff, axis=1))


def direct_estimates(logged: LoggedTokens, cand: list[np.ndarray]) -> dict[str, float]:
    w = direct_weights(logged, cand)
    r, last = logged.rewards, logged.lengths - 1
    w_traj = w[np.arange(logged.n), last]           # = w[:, -1]: padding has weight 1
    # Reward only on the last real token: PDIS sums w_{0:t} r_t, which leaves w_{0:T_i-1} R_i.
    per_step_norm = w.mean(axis=0)[last]            # SNPDIS normalises per step across responses
    return {
        "tis": float(np.mean(w_traj * r)),
        "pdis": float(np.mean(w_traj * r)),
        "sntis": float(np.mean(w_traj * r) / (np.mean(w_traj) + 1e-10)),
        "snpdis": float(np.mean(w_traj / (per_step_norm + 1e-10) * r)),
    }


# ------------------------------------------------------------------ encoding and IS estimators
def test_encoding_layout():
    logged, cands = ragged(n=5)
    ds, inp = encode_two_action(logged, cands)
    t, n = logged.max_len, logged.n
    assert ds["n_actions"] == 2 and ds["step_per_trajectory"] == t and ds["size"] == n * t
    assert ds["state"].shape == (n * t, ds["state_dim"]) and (ds["action"] == 0).all()
    mask = logged.mask().reshape(-1)
    assert np.allclose(ds["pscore"][~mask], 1.0)                  # padding: pscore 1
    assert np.allclose(ds["reward"][~mask], 0.0)                  # padding: reward 0
    done = ds["done"].reshape(n, t)
    assert (done.sum(axis=1) == 1).all() and (done[np.arange(n), logged.lengths - 1] == 1).all()
    assert np.allclose(ds["reward"].reshape(n, t)[np.arange(n), logged.lengths - 1], logged.rewards)
    dist = inp["cand0"]["evaluation_policy_action_dist"]
    assert np.allclose(dist.sum(axis=1), 1.0) and np.allclose(dist[~mask, 0], 1.0)
    assert np.allclose(dist[mask, 0], np.exp(np.concatenate(cands["cand0"])))


def test_is_estimators_match_direct_formulas():
    logged, cands = ragged(seed=1)
    res = estimate(logged, cands, IS_FAMILY, n_bootstrap=20)
    for name, lps in cands.items():
        direct = direct_estimates(logged, lps)
        for est in IS_FAMILY:
            got = res[est]["estimates"][name]
            assert got["value"] == pytest.approx(direct[est], rel=1e-9), (est, name)
            assert got["ci_low"] <= got["ci_high"]
        assert direct["pdis"] == pytest.approx(direct["tis"])
        w = direct_weights(logged, lps)[:, -1]
        assert res["tis"]["ess_per_candidate"][name] == pytest.approx(w.sum() ** 2 / (w ** 2).sum())
    json.dumps(res)  # plain floats only


def test_kish_ess_and_identical_policy():
    assert kish_ess(np.zeros(10)) == pytest.approx(10.0)
    assert kish_ess(np.array([0.0, -np.inf, -np.inf])) == pytest.approx(1.0)
    logged, _ = ragged(seed=2)
    res = estimate(logged, {"same": logged.behaviour_logprobs}, ["tis", "snpdis"], n_bootstrap=20)
    assert res["tis"]["estimates"]["same"]["value"] == pytest.approx(logged.behavior_value)
    assert res["tis"]["ess"] == pytest.approx(logged.n)


def test_underflow_warns():
    logged = LoggedTokens([np.full(80, -10.0)], np.array([1.0]))
    with pytest.warns(RuntimeWarning, match="underflow"):
        encode_two_action(logged, {"c": [np.full(80, -10.0)]})


# ------------------------------------------------------------------ DM / DR
def prompt_difficulty_data(n: int = 2000, seed: int = 0):
    """Reward ~ Bernoulli(p_i) whatever the tokens; states reveal p_i. Every policy's value = mean p."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 11, n)
    p = rng.uniform(0.1, 0.9, n)
    rewards = (rng.uniform(size=n) < p).astype(float)
    beh = [np.log(rng.uniform(0.3, 1.0, t)) for t in lengths]
    other = [np.log(np.clip(np.exp(b) * rng.uniform(0.8, 1.2, b.shape), 1e-6, 1.0)) for b in beh]
    # Constant along each response (a prompt-level feature plus per-prompt noise).
    states = [np.tile(np.r_[p_i, rng.normal(size=2)], (t + 1, 1)) for t, p_i in zip(lengths, p)]
    return LoggedTokens(beh, rewards), {"same": beh, "other": other}, states, float(p.mean())


def test_dm_dr_with_prompt_level_states():
    logged, cands, states, truth = prompt_difficulty_data()
    res = estimate(logged, cands, ["dm", "dr", "sndr"], n_bootstrap=20,
                   candidate_states={c: states for c in cands})
    for c in cands:
        assert res["dm"]["estimates"][c]["value"] == pytest.approx(truth, abs=0.02)
        assert res["dr"]["estimates"][c]["value"] == pytest.approx(truth, abs=0.04)
    # Identical policy and a Q̂ constant within each response: DR telescopes to the mean reward.
    assert res["dr"]["estimates"]["same"]["value"] == pytest.approx(logged.behavior_value, abs=1e-9)
    assert res["sndr"]["estimates"]["same"]["value"] == pytest.approx(logged.behavior_value, abs=1e-6)


def test_dm_oracle_and_dr_informative_states():
    rng = np.random.default_rng(3)
    logged, cands, _, _ = prompt_difficulty_data(n=1500, seed=3)
    r = logged.rewards
    oracle = [np.c_[np.full(t + 1, r_i)] for t, r_i in zip(logged.lengths, r)]
    # Evidence about the reward that builds up along the response.
    ramp = [np.c_[np.linspace(0, 1, t + 1) * (2 * r_i - 1) + rng.normal(0, 0.5, t + 1)]
            for t, r_i in zip(logged.lengths, r)]
    res = estimate(logged, {"same": cands["same"], "also_same": cands["same"]}, ["dm", "dr", "sndr"],
                   n_bootstrap=20, candidate_states={"same": oracle, "also_same": ramp})
    assert res["dm"]["estimates"]["same"]["value"] == pytest.approx(logged.behavior_value, abs=1e-3)
    for est in ("dr", "sndr"):
        assert res[est]["estimates"]["also_same"]["value"] == pytest.approx(logged.behavior_value,
                                                                            abs=0.03)


def test_dr_q_forms_on_token_dependent_reward():
    """Reward = all 3 tokens "good"; π_b(good) = 0.5, candidate 0.7: true value 0.343.

    States carry the behaviour value of the prefix. IS and the state-baseline DR are unbiased; the
    ALGORITHMS.md form ("next_state") is biased towards the behaviour value (documented).
    """
    rng = np.random.default_rng(7)
    n, pb, pe = 4000, 0.5, 0.7
    good = rng.uniform(size=(n, 3)) < pb
    logged = LoggedTokens([np.log(np.where(g, pb, 1 - pb)) for g in good], good.all(1).astype(float))
    cand = {"c": [np.log(np.where(g, pe, 1 - pe)) for g in good]}
    alive = [np.r_[1.0, np.cumprod(g)] for g in good]
    states = {"c": [np.c_[a * pb ** (3 - np.arange(4)), a] for a in alive]}
    kw = dict(n_bootstrap=20, candidate_states=states)
    base = estimate(logged, cand, ["tis", "dr", "sndr"], q_form="state_baseline", **kw)
    nxt = estimate(logged, cand, ["dr"], q_form="next_state", **kw)
    for est in ("tis", "dr", "sndr"):
        assert base[est]["estimates"]["c"]["value"] == pytest.approx(pe ** 3, abs=0.05), est
    assert nxt["dr"]["estimates"]["c"]["value"] < 0.3


def test_model_based_skipped_without_states():
    logged, cands = ragged(seed=4)
    states = {"cand0": [np.zeros((t + 1, 2)) for t in logged.lengths]}
    res = estimate(logged, cands, ["tis", "dr"], n_bootstrap=10, candidate_states=states)
    assert set(res["dr"]["estimates"]) == {"cand0"} and res["dr"]["skipped"] == ["cand1", "cand2"]
    assert set(res["tis"]["estimates"]) == set(cands)


# ------------------------------------------------------------------ selection
def test_sharpe_ratio_hand_computed():
    est = {"a": 0.9, "b": 0.8, "c": 0.1, "d": 0.5}        # ranking a, b, d, c
    true = {"a": 0.4, "b": 0.7, "c": 0.9, "d": 0.6}
    assert math.isnan(sharpe_ratio_at_k(est, true, 0.5, 1))
    assert sharpe_ratio_at_k(est, true, 0.5, 2) == pytest.approx(0.2 / 0.2121320344)
    assert sharpe_ratio_at_k(est, true, 0.5, 3) == pytest.approx(0.2 / 0.1527525232)
    assert sharpe_ratio_at_k(est, true, 0.5, 4) == pytest.approx(0.4 / 0.2081665999)
    arrays = sharpe_ratio_at_k(list(est.values()), list(true.values()), 0.5, 3)
    assert arrays == pytest.approx(0.2 / 0.1527525232)
    assert sharpe_ratio_at_k(est, true, 0.95, 2) == 0.0                       # clipped at 0
    assert sharpe_ratio_at_k([2, 1], [0.7, 0.7], 0.5, 2) == math.inf          # std 0
    assert math.isnan(sharpe_ratio_at_k([2, 1], [0.7, 0.7], 0.8, 2))          # 0 / 0


def test_sharpe_ratio_matches_scope_rl():
    logged, cands = ragged(seed=5, n=80, n_cands=5)
    rng = np.random.default_rng(5)
    truth = {c: rng.integers(0, 2, 30).astype(float) for c in cands}
    ds, inp = encode_two_action(logged, cands, on_policy_values=truth)
    ope = make_ope(ds, ["tis"])
    ops = scope().OffPolicySelection(ope=ope)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # std@1 of one value
        df = ops.obtain_topk_policy_value_selected_by_standard_ope(inp, max_topk=5,
                                                                   return_by_dataframe=True)
    points = ope.estimate_policy_value(inp)
    est = {c: points[c]["tis"] for c in inp}
    true = {c: truth[c].mean() for c in inp}
    for k in range(2, 6):
        theirs = float(df[df["topk"] == k - 1]["sharpe_ratio"].iloc[0])
        assert sharpe_ratio_at_k(est, true, logged.behavior_value, k) == pytest.approx(theirs, rel=1e-6)


def test_choose_rules_and_ties():
    res = {"tis": {"estimates": {
        "b": {"value": 0.7, "ci_low": 0.5, "ci_high": 0.9},
        "a": {"value": 0.7, "ci_low": 0.3, "ci_high": 1.0},
        "c": {"value": 0.6, "ci_low": 0.55, "ci_high": 0.65},
        "d": {"value": None, "ci_low": None, "ci_high": None}}}}
    assert choose(res, "tis", "estimate") == "a"          # tie 0.7: alphabetical
    assert choose(res, "tis", "lower_bound") == "c"
    with pytest.raises(ValueError):
        choose(res, "tis", "median")
    with pytest.raises(ValueError):
        choose(res, "dr", "estimate")


def test_promotion_gate():
    assert promotion_gate(0.5, None, 0.1)[0] is True
    assert promotion_gate(0.61, 0.5, 0.1)[0] is True
    ok, why = promotion_gate(0.6, 0.5, 0.1)
    assert ok is False and "margin" in why
    assert promotion_gate(float("nan"), 0.5, 0.0)[0] is False


def test_selection_metrics_four_candidates():
    # 40 responses of 3 tokens, pi_b = 0.5; candidate X scales pi on rewarded responses by f_X,
    # so TIS = 0.5 * f^3 and the estimated ranking is A > B > C > D.
    n = 40
    rewards = np.arange(n) % 2 == 0
    beh = [np.full(3, np.log(0.5)) for _ in range(n)]
    factors = {"A": 1.2, "B": 1.1, "C": 1.0, "D": 0.9}
    cands = {c: [np.full(3, np.log(0.5 * (f if r else 1.0))) for r in rewards]
             for c, f in factors.items()}
    means = {"A": 0.5, "B": 0.8, "C": 0.3, "D": 0.1}
    truth = {c: (np.arange(10) < 10 * m).astype(float) for c, m in means.items()}
    logged = LoggedTokens(beh, rewards.astype(float))
    out = selection_metrics(logged, cands, truth, ["tis", "snpdis"], top_k=4)
    json.dumps(out)
    m = out["tis"]
    assert set(m) >= {"sharpe_ratio_at_k", "best_at_k", "worst_at_k", "mean_at_k", "std_at_k",
                      "safety_violation_rate_at_k", "regret_at_1", "nmse", "rank_correlation"}
    assert list(m["sharpe_ratio_at_k"]) == ["2", "3", "4"]
    assert m["estimated_ranking"] == ["A", "B", "C", "D"]
    assert m["regret_at_1"] == pytest.approx(0.8 - 0.5)
    assert m["sharpe_ratio_at_k"]["2"] == pytest.approx((0.8 - 0.5) / 0.2121320344, rel=1e-6)
    assert m["best_at_k"] == pytest.approx({"1": 0.5, "2": 0.8, "3": 0.8, "4": 0.8})
    assert m["safety_violation_rate_at_k"] == pytest.approx({"1": 0, "2": 0, "3": 1 / 3, "4": 0.5})
    assert m["std_at_k"]["1"] is None
    assert m["rank_correlation"] == pytest.approx(0.8)      # true order B, A, C, D
    est = np.array([0.5 * f ** 3 for f in factors.values()])
    tv = np.array(list(means.values()))
    assert m["nmse"] == pytest.approx(np.mean((est - tv) ** 2) / np.var(tv), rel=1e-6)


# ------------------------------------------------------------------ VSDR
def test_vsdr_scores_hand_computed():
    sim, ood = {"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 3.0, "b": 1.0, "c": 2.0}
    z = 1.224744871  # 1 / sqrt(2/3)
    assert vsdr_scores(sim, ood) == pytest.approx({"a": -2 * z, "b": z, "c": z})
    assert vsdr_scores(sim, ood, alpha=0.5) == pytest.approx({"a": -1.5 * z, "b": 0.5 * z, "c": z})
    flat = vsdr_scores(sim, {"a": 1.0, "b": 1.0, "c": 1.0})             # std 0 -> z = 0
    assert flat == pytest.approx({"a": -z, "b": 0.0, "c": z})


def test_vsdr_report():
    sim, ood = {"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 3.0, "b": 1.0, "c": 2.0}
    true = {"a": 0.1, "b": 0.5, "c": 0.9}
    rep = vsdr_report(sim, ood, true, alpha=0.5)
    assert rep["spearman"] == pytest.approx({"vsdr": 1.0, "sim_only": 1.0, "ood_only": 0.5})
    assert rep["regret_at_1"] == pytest.approx({"vsdr": 0.0, "sim_only": 0.0, "ood_only": 0.4})
    json.dumps(rep)


# ------------------------------------------------------------------ I/O
def test_save_load_round_trip(tmp_path):
    logged, cands = ragged(seed=6, n=12)
    cands["rl/grpo:seed=1"] = cands.pop("cand1")
    states = {"rl/grpo:seed=1": [np.random.default_rng(i).normal(size=(t + 1, 4))
                                 for i, t in enumerate(logged.lengths)]}
    path = save_inputs(tmp_path / "ope_inputs.npz.tmp", logged, cands, states)
    assert path.exists() and path.name == "ope_inputs.npz.tmp"
    logged2, cands2, states2 = load_inputs(path)
    assert np.array_equal(logged2.rewards, logged.rewards)
    assert all(np.array_equal(a, b)
               for a, b in zip(logged2.behaviour_logprobs, logged.behaviour_logprobs))
    assert set(cands2) == set(cands) and set(states2) == set(states)
    for c in cands:
        assert all(np.array_equal(a, b) for a, b in zip(cands2[c], cands[c]))
    assert all(np.array_equal(a, b) for a, b in zip(states2["rl/grpo:seed=1"], states["rl/grpo:seed=1"]))


def test_promotion_gate_never_promotes_without_signal():
    # all logged rewards equal: no estimator can rank the candidates, even with no champion registered
    ok, why = promotion_gate(0.0, None, 0.0, candidates=[0.0, 0.0, 0.0], logged_rewards=[0.0] * 5)
    assert ok is False and "no signal" in why and "logged reward" in why
    # rewards vary but every candidate ties: the "champion" is the first of equals
    ok, why = promotion_gate(0.3, None, 0.0, candidates=[0.3, 0.3], logged_rewards=[0.0, 1.0])
    assert ok is False and "tie" in why
    # one candidate apart from the rest, rewards vary: promoted as before
    assert promotion_gate(0.4, None, 0.0, candidates=[0.3, 0.4], logged_rewards=[0.0, 1.0])[0] is True
