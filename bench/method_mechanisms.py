"""Which of each method's mechanisms act under the loop's update: a few RL steps of every preset from the same SFT
model, with the pipeline's RL settings and each preset's own optimizer steps per rollout (docs/algorithms.md).

    python bench/method_mechanisms.py --root <a finished tiny run> --steps 8 --seeds 0 1 2

Per method: optimizer steps per rollout, the clip fraction (over generated tokens), OPMD's proximal-term gradient
factor tau |s - s_old|, the KL (when beta > 0), sampled reward. A short run from the SFT model: it says whether a
clip or a proximal term acts at all, not how well a method learns (that is bench/compare_methods.py). The
distillation teacher (opd, exopd) is the pipeline's base model here: a stand-in, enough to see the update act.
Results: bench/results/methods_mechanisms_<pipeline>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEYS = ("optimizer_steps", "mini_batches", "clip_frac", "opmd/prox_grad", "kl", "reward", "loss")


def run(root: Path, pipeline: str, method: str, seed: int, steps: int) -> dict:
    import torch

    from alignflow import models
    from alignflow.algorithms import ALGORITHMS
    from alignflow.config import CandidateConfig, load_pipeline
    from alignflow.data.rows import read_rows
    from alignflow.layout import Layout
    from alignflow.steps.train import candidate_inputs
    from alignflow.train import rl
    torch.set_num_threads(2)
    cfg = load_pipeline(pipeline, root / "pipelines.yaml")
    layout = Layout(root, pipeline)
    rows = read_rows(layout.curated, "rl")
    cand = CandidateConfig(name=method, algorithm=method, seeds=[seed], steps=steps, checkpoints=[steps],
                           lr=cfg.rl.candidates[0].lr, warmup_steps=cfg.rl.candidates[0].warmup_steps)
    model, tok = models.load(layout.sft, cfg.device)
    inputs = candidate_inputs(layout, cfg.device, cand, rows, teacher=layout.base)
    rl_cfg = cfg.rl.model_copy(update={"mini_batches": None})   # each preset's own steps per rollout
    logs = []
    with tempfile.TemporaryDirectory() as tmp:
        rl.train_candidate(model, tok, cand, seed, rl_cfg, rows, None, Path(tmp), on_log=lambda s, m: logs.append(m),
                           **inputs)
    out = {"method": method, "seed": seed, "steps": steps, "preset_mini_batches": ALGORITHMS[method].mini_batches}
    for key in KEYS:
        values = [m[key] for m in logs if key in m]
        out[key] = statistics.fmean(values) if values else None
    return out


def main() -> None:
    from alignflow.algorithms import ALGORITHMS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--pipeline", default="tiny")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(ALGORITHMS))
    args = parser.parse_args()
    out_path = ROOT / "bench" / "results" / f"methods_mechanisms_{args.pipeline}.json"
    runs = []
    for method in args.methods:
        for seed in args.seeds:
            started = time.perf_counter()
            runs.append({**run(args.root, args.pipeline, method, seed, args.steps),
                         "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(runs[-1]), flush=True)
            out_path.write_text(json.dumps({"command": " ".join(sys.argv), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
