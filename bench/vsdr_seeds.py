"""VSDR versus sim-only and OOD-only ranking over several pipeline seeds (issue 5).

For each seed: a fresh project (this repo's tracked files, as a user's clone), `alignflow run --pipeline tiny
-S seed=N -S curate.generator.seed=N` (new data, new base/SFT/RL initialisation), then the `selection.vsdr` part of
its metrics/tiny/evaluate.json: Spearman correlation with the candidates' true real-split values and regret@1 of
each ranking. Writes bench/results/vsdr_seeds.json with every seed's figures and the mean with a 95% t-interval.

    python bench/vsdr_seeds.py --seeds 0 1 2                          # ~12 min a seed on 2 cores
    python bench/vsdr_seeds.py --seeds 1 2 --existing reports/tiny/evaluate.json   # reuse a finished seed-0 run
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.conftest import alignflow, make_project  # noqa: E402

RANKINGS = ("vsdr", "sim_only", "ood_only")


def run_seed(seed: int, workdir: Path) -> dict:
    root = make_project(workdir / f"seed{seed}", tracked="tiny")
    started = time.time()
    alignflow(root, "run", "--pipeline", "tiny", "-S", f"seed={seed}", "-S", f"curate.generator.seed={seed}",
              timeout=3 * 3600)
    return figures(json.loads((root / "reports/tiny/evaluate.json").read_text()), seed, time.time() - started)


def figures(evaluate: dict, seed, seconds: float | None = None) -> dict:
    vsdr = evaluate["selection"]["vsdr"]
    return {"seed": seed, "spearman": vsdr["spearman"], "regret_at_1": vsdr["regret_at_1"], "top_1": vsdr["top_1"],
            "champion": evaluate["champion"], "seconds": round(seconds, 1) if seconds else None}


def interval(values: list[float]) -> dict:
    from scipy import stats
    mean = statistics.mean(values)
    half = (stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
            if len(values) > 1 else float("nan"))
    return {"mean": round(mean, 4), "ci95_half_width": round(half, 4)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--existing", nargs="*", default=[], help="evaluate.json files of finished runs to include")
    parser.add_argument("--out", default=str(REPO / "bench/results/vsdr_seeds.json"))
    args = parser.parse_args()
    runs = [figures(json.loads(Path(p).read_text()), f"existing:{p}") for p in args.existing]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            runs.append(run_seed(seed, Path(tmp)))
            print(json.dumps(runs[-1]), flush=True)
    summary = {metric: {r: interval([run[metric][r] for run in runs]) for r in RANKINGS}
               for metric in ("spearman", "regret_at_1")}
    wins = {r: sum(run["spearman"]["vsdr"] > run["spearman"][r] for run in runs) for r in RANKINGS[1:]}
    out = {"pipeline": "tiny", "n_runs": len(runs), "summary": summary, "vsdr_spearman_wins": wins, "runs": runs,
           "command": "python bench/vsdr_seeds.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
