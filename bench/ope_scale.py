"""How `alignflow.ope.estimate` scales with candidates x logged responses.

Synthetic logs: N responses of 32 tokens, random behaviour log-probs, candidates that perturb them,
random state features (S=16) for every candidate, all 7 estimators, n_bootstrap=100.
Headline: 16 candidates x 1,000 responses (goal <= 60 s on 2 cores). Writes bench/results/ope_scale.json.

    python bench/ope_scale.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from alignflow.ope import LoggedTokens, estimate
from alignflow.ope.estimators import prepare, scope

T, S = 32, 16
ESTIMATORS = ["dm", "tis", "pdis", "sntis", "snpdis", "dr", "sndr"]
N_BOOTSTRAP = 100
GRID = [(2, 250), (4, 250), (4, 500), (8, 500), (8, 1000), (16, 1000), (16, 2000)]
REPEATS = 2  # best of, to damp scheduler noise on a small box
OUT = Path(__file__).parent / "results" / "ope_scale.json"


def synthetic(n_cands: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    beh = [np.log(rng.uniform(0.05, 1.0, T)) for _ in range(n)]
    rewards = rng.integers(0, 2, n).astype(float)
    cands = {f"cand{j:02d}": [np.minimum(b + rng.normal(0, 0.1, T), 0.0) for b in beh]
             for j in range(n_cands)}
    states = {c: [rng.normal(size=(T + 1, S)) for _ in range(n)] for c in cands}
    return LoggedTokens(beh, rewards), cands, states


def timed(fn, *args, **kw) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - start, out


def breakdown(n_cands: int, n: int) -> dict:
    """Seconds per phase: encoding + value model, point estimates, bootstrap intervals."""
    logged, cands, states = synthetic(n_cands, n)
    t_prep, (ope, inp, groups) = timed(prepare, logged, cands, ESTIMATORS, candidate_states=states)
    t_point = t_boot = 0.0
    for ests, names in groups:
        sub = {c: inp[c] for c in names}
        t_point += timed(ope.estimate_policy_value, sub, compared_estimators=ests)[0]
        t_boot += timed(ope.estimate_intervals, sub, compared_estimators=ests, ci="bootstrap",
                        n_bootstrap_samples=N_BOOTSTRAP, random_state=0)[0]
    return {"encode_and_value_model_s": t_prep, "point_estimates_s": t_point,
            "bootstrap_intervals_s": t_boot}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small grid only (smoke test)")
    args = ap.parse_args()
    grid = GRID[:3] if args.quick else GRID

    t_import, _ = timed(scope)  # one-off SCOPE-RL import, kept out of the per-call timings
    warm = synthetic(2, 20)      # first-call costs (sklearn import, lazy numpy paths)
    estimate(*warm[:2], ESTIMATORS, n_bootstrap=10, candidate_states=warm[2])
    rows = []
    for n_cands, n in grid:
        logged, cands, states = synthetic(n_cands, n)
        secs = min(timed(estimate, logged, cands, ESTIMATORS, n_bootstrap=N_BOOTSTRAP,
                         candidate_states=states)[0] for _ in range(REPEATS))
        work = n_cands * n * T
        rows.append({"candidates": n_cands, "n_responses": n, "tokens_per_response": T,
                     "candidates_x_tokens": work, "seconds": round(secs, 4),
                     "us_per_candidate_token": round(1e6 * secs / work, 4)})
        print(f"{n_cands:3d} candidates x {n:5d} responses: {secs:7.3f} s "
              f"({rows[-1]['us_per_candidate_token']:.3f} us per candidate-token)")

    head = next((r for r in rows if (r["candidates"], r["n_responses"]) == (16, 1000)), None)
    result = {
        "estimators": ESTIMATORS, "n_bootstrap": N_BOOTSTRAP, "state_dim": S,
        "timing": f"best of {REPEATS} calls of estimate(), SCOPE-RL already imported",
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "scope_rl_import_s": round(t_import, 3),
        "grid": rows,
        "headline_16x1000_s": head["seconds"] if head else None,
        "headline_goal_s": 60,
        "headline_breakdown_s": None if args.quick else
        {k: round(v, 4) for k, v in breakdown(16, 1000).items()},
        "ratio_spread": round(max(r["us_per_candidate_token"] for r in rows)
                              / min(r["us_per_candidate_token"] for r in rows), 3),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "grid"}, indent=2))


if __name__ == "__main__":
    main()
