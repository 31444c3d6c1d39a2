"""Does the tiny pipeline still learn with several optimizer steps per rollout? GRPO from the same SFT model with
the pipeline's RL settings (16 prompts x 8, T = 0.5, lr of its first candidate, its step count), one run per
(rl.mini_batches, seed), scored greedily on the eval and OOD splits at every checkpoint.

    python bench/tiny_rl_check.py --root <a finished tiny run> --mini-batches 1 4 --seeds 0 1 --out check.json

One process per run (spawned; they share a GPU when there is one). The runs' logged clip fraction and optimizer
steps per rollout are averaged per quarter of the run.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def greedy_accuracy(model, tok, rows) -> float:
    from alignflow.evaluation import score
    from alignflow.rewards import RewardSet, accuracy_reward
    return score(model, tok, rows, RewardSet.of(accuracy_reward))["value"]


def run(job: tuple) -> dict:
    root, pipeline, mini_batches, seed, steps = job
    import torch

    from alignflow import models
    from alignflow.config import load_pipeline
    from alignflow.data.rows import read_rows
    from alignflow.layout import Layout
    from alignflow.train import rl
    started = time.perf_counter()
    cfg = load_pipeline(pipeline, Path(root) / "pipelines.yaml")
    layout = Layout(Path(root), pipeline)
    cand = cfg.rl.candidates[0].model_copy(update={"seeds": [seed], "steps": steps,
                                                    "checkpoints": [steps // 3, 2 * steps // 3, steps]})
    rl_cfg = cfg.rl.model_copy(update={"mini_batches": mini_batches})
    model, tok = models.load(layout.sft, cfg.device)
    held_out = {name: read_rows(layout.curated, name) for name in ("eval", "ood")}
    logs, scores = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        result = rl.train_candidate(model, tok, cand, seed, rl_cfg, read_rows(layout.curated, "rl"), None, Path(tmp),
                                    on_log=lambda s, m: logs.append(m))
        for snap in result.snapshots:
            policy, _ = models.load(snap, cfg.device)
            scores[snap.name.rsplit("-", 1)[1]] = {name: greedy_accuracy(policy, tok, rows)
                                                   for name, rows in held_out.items()}
    quarter = max(1, len(logs) // 4)
    per_quarter = lambda key: [round(statistics.fmean(m.get(key, 0.0) for m in logs[i:i + quarter]), 4)  # noqa: E731
                               for i in range(0, len(logs), quarter)][:4]
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"mini_batches": mini_batches, "seed": seed, "steps": steps, "greedy": scores,
            "clip_frac_by_quarter": per_quarter("clip_frac"), "reward_by_quarter": per_quarter("reward"),
            "optimizer_steps_per_rollout": statistics.fmean(m["optimizer_steps"] for m in logs),
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--pipeline", default="tiny")
    parser.add_argument("--mini-batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=None, help="default: the pipeline's first candidate's")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from alignflow import models
    from alignflow.config import load_pipeline
    from alignflow.data.rows import read_rows
    from alignflow.layout import Layout
    cfg = load_pipeline(args.pipeline, args.root / "pipelines.yaml")
    steps = args.steps or cfg.rl.candidates[0].steps
    layout = Layout(args.root, args.pipeline)
    sft, tok = models.load(layout.sft, cfg.device)
    sft_scores = {name: greedy_accuracy(sft, tok, read_rows(layout.curated, name)) for name in ("eval", "ood")}
    jobs = [(str(args.root), args.pipeline, k, s, steps) for k in args.mini_batches for s in args.seeds]
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        runs = pool.map(run, jobs)
    out = {"command": " ".join(sys.argv), "device": cfg.device, "sft": sft_scores, "runs": runs}
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
