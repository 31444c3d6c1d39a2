"""The RL stage on 1 GPU and on N GPUs of the same host (torchrun + DDP), in one run: throughput and learning.

    python bench/rl_multi_gpu.py --pipeline gpu --gpus 1 2 --out bench/results/rl_multi_gpu.json

Needs the pipeline's curated splits and SFT model (python -m alignflow.steps base|sft --pipeline gpu). Each
run is the real stage command (`python -m alignflow.steps rl`, under `torchrun --nproc_per_node N` for N > 1)
on the same config and global batch; throughput counts sampled completions per second of steady-state RL
training (the stage's own per-step timings after the first 5 steps, so model loading, compilation, graph capture and
evaluation are outside it; the whole stage's rate is reported beside it). Learning: the reward
curve and the last checkpoint's greedy accuracy on the eval split.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 5
sys.path.insert(0, str(ROOT))


def greedy_accuracy(pipeline: str, model_dir: Path) -> float:
    import torch

    from alignflow import models
    from alignflow.config import load_pipeline
    from alignflow.evaluation import score
    from alignflow.layout import Layout
    from alignflow.stage import read_split
    layout, cfg = Layout(ROOT, pipeline), load_pipeline(pipeline, ROOT / "pipelines.yaml")
    eval_rows = read_split(layout.curated, "eval")
    model, tok = models.load(model_dir, cfg.device)
    from alignflow.data.rows import TaskRows
    from alignflow.rewards import RewardSet, accuracy_reward
    accuracy = score(model, tok, TaskRows.from_frame(eval_rows), RewardSet.of(accuracy_reward),
                     batch_size=cfg.evaluate.batch_size)["value"]
    del model
    torch.cuda.empty_cache()
    return accuracy


def run_stage(pipeline: str, n_gpus: int) -> dict:
    import pandas as pd

    from alignflow.config import load_pipeline
    from alignflow.layout import Layout
    layout, cfg = Layout(ROOT, pipeline), load_pipeline(pipeline, ROOT / "pipelines.yaml")
    shutil.rmtree(layout.rl, ignore_errors=True)
    launcher = [sys.executable] if n_gpus == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     "--nproc_per_node", str(n_gpus)]
    started = time.time()
    subprocess.run([*launcher, "-m", "alignflow.steps", "rl", "--pipeline", pipeline], cwd=ROOT, check=True)
    wall = time.time() - started
    curve = pd.read_csv(layout.metrics / "rl_curve.csv")
    steps = len(curve)
    completions = steps * cfg.rl.prompts_per_step * cfg.rl.group_size
    train_seconds = float(json.loads((layout.metrics / "rl.json").read_text())["seconds"])
    # steady state: the steps after the first WARMUP (compile, CUDA-graph capture and allocator warm-up happen there)
    steady = curve["step_seconds"].iloc[WARMUP:]
    per_step = cfg.rl.prompts_per_step * cfg.rl.group_size
    last = sorted(layout.rl.iterdir(), key=lambda p: int(p.name.rsplit("-", 1)[1]))[-1]
    greedy = greedy_accuracy(pipeline, last)
    quarter = max(1, steps // 4)
    return {"n_gpus": n_gpus, "steps": steps, "completions": completions, "stage_seconds": train_seconds,
            "wall_seconds": round(wall, 1), "stage_completions_per_s": round(completions / train_seconds, 1),
            "steady_step_seconds": round(float(steady.mean()), 4),
            "steady_phase_seconds": {k: round(float(curve[f"{k}_seconds"].iloc[WARMUP:].mean()), 4)
                                     for k in ("rollout", "update", "sync")},
            "completions_per_s": round(per_step / float(steady.mean()), 1),
            "reward_by_quarter": [round(float(curve["reward"].iloc[i:i + quarter].mean()), 3)
                                  for i in range(0, steps, quarter)],
            "last_checkpoint": last.name, "greedy_eval_accuracy": greedy}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline", default="gpu")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=str(ROOT / "bench/results/rl_multi_gpu.json"))
    args = parser.parse_args()
    import torch
    from alignflow.config import load_pipeline
    from alignflow.layout import Layout
    cfg = load_pipeline(args.pipeline, ROOT / "pipelines.yaml")
    sft_greedy = greedy_accuracy(args.pipeline, Layout(ROOT, args.pipeline).sft)
    runs = [run_stage(args.pipeline, n) for n in args.gpus]
    single = next(r for r in runs if r["n_gpus"] == 1)
    widest = max(runs, key=lambda r: r["n_gpus"])
    out = {"device": torch.cuda.get_device_name(0), "n_gpus": widest["n_gpus"],
           "speedup_vs_1gpu": round(widest["completions_per_s"] / single["completions_per_s"], 3),
           "engine": cfg.rl.engine, "completions_per_step": cfg.rl.prompts_per_step * cfg.rl.group_size,
           "sft_greedy_eval_accuracy": sft_greedy, "runs": runs, "command": "python bench/rl_multi_gpu.py " + " ".join(sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
