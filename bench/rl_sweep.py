"""RL hyper-parameter sweep from a finished SFT model: train each setting on the one loop, report greedy
held-out accuracy at its checkpoints. Used to choose the default pipeline's RL settings (on a GPU the
tiny model's runs take seconds; the math is the same as on CPU).

    python bench/rl_sweep.py --pipeline tiny --steps 300 --out bench/results/rl_sweep.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GRID = [  # name, algorithm, lr, warmup steps, temperature, prompts_per_step, hparams
    ("grpo-lr1e-4", "grpo", 1e-4, 0, 1.0, 16, {}),
    ("grpo-lr1e-4-warm50", "grpo", 1e-4, 50, 1.0, 16, {}),
    ("grpo-lr3e-5", "grpo", 3e-5, 0, 1.0, 16, {}),
    ("grpo-lr3e-5-warm50", "grpo", 3e-5, 50, 1.0, 16, {}),
    ("grpo-lr5e-5-warm50-t0.7", "grpo", 5e-5, 50, 0.7, 16, {}),
    ("grpo-lr5e-5-warm50-p32", "grpo", 5e-5, 50, 1.0, 32, {}),
    ("grpo-lr1e-5", "grpo", 1e-5, 0, 1.0, 16, {}),
    ("grpo-lr5e-5-warm50-kl", "grpo", 5e-5, 50, 1.0, 16, {"beta": 0.04}),
    ("dr_grpo-lr3e-5-warm50", "dr_grpo", 3e-5, 50, 1.0, 16, {}),
    ("grpo-lr3e-5-warm50-t0.7-p32", "grpo", 3e-5, 50, 0.7, 32, {}),
]


def run_one(args) -> dict:
    name, algo, lr, warmup, temp, prompts_per_step, hp, pipeline, steps, device, seed = args
    import torch
    from alignflow import models
    from alignflow.config import CandidateConfig, RLConfig
    from alignflow.evaluation import score
    from alignflow.layout import Layout
    from alignflow.stage import read_split
    from alignflow.train import rl
    torch.set_num_threads(1)
    layout = Layout(ROOT, pipeline)
    rl_rows, eval_rows = read_split(layout.curated, "rl"), read_split(layout.curated, "eval")
    model, tok = models.load(layout.sft, device)
    checkpoints = [steps // 3, 2 * steps // 3, steps]
    cand = CandidateConfig(name="s", algorithm=algo, seeds=[seed], steps=steps, checkpoints=checkpoints, lr=lr,
                           warmup_steps=warmup, hparams=hp)
    extra = rl.ExtraModels(ref=models.load(layout.sft, device)[0].eval()) if hp.get("beta") else None
    rewards, started = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        rl.train_candidate(model, tok, cand, seed, RLConfig(prompts_per_step=prompts_per_step, temperature=temp),
                           rl_rows["prompt"].tolist(), rl_rows["answer"].astype(str).tolist(), Path(tmp),
                           on_log=lambda s, m: rewards.append(m["reward"]), extra_models=extra)
        greedy = {}
        for c in checkpoints:
            snap, _ = models.load(Path(tmp) / "snapshots" / f"s-s{seed}-{c}", device)
            greedy[c] = score(snap, tok, eval_rows["prompt"].tolist(), eval_rows["answer"].astype(str).tolist())["accuracy"]
    third = max(1, steps // 3)
    return {"name": name, "algorithm": algo, "lr": lr, "warmup_steps": warmup, "temperature": temp, "prompts_per_step": prompts_per_step,
            "hparams": hp, "seed": seed, "greedy_eval_accuracy": greedy,
            "mean_reward_by_third": [round(sum(rewards[i:i + third]) / third, 3) for i in range(0, steps, third)],
            "seconds": round(time.time() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline", default="tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "bench/results/rl_sweep.json"))
    args = parser.parse_args()
    from alignflow import models
    from alignflow.evaluation import score
    from alignflow.layout import Layout
    from alignflow.stage import read_split
    layout = Layout(ROOT, args.pipeline)
    sft, tok = models.load(layout.sft, args.device)
    eval_rows = read_split(layout.curated, "eval")
    sft_greedy = score(sft, tok, eval_rows["prompt"].tolist(), eval_rows["answer"].astype(str).tolist())["accuracy"]
    jobs = [(*g, args.pipeline, args.steps, args.device, seed) for seed in args.seeds for g in GRID]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        results = pool.map(run_one, jobs)
    out = {"pipeline": args.pipeline, "sft_greedy_eval_accuracy": sft_greedy, "steps": args.steps,
           "device": args.device, "runs": results, "command": "python bench/rl_sweep.py " + " ".join(sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"SFT greedy {sft_greedy:.3f}")
    for r in sorted(results, key=lambda r: -max(r["greedy_eval_accuracy"].values())):
        print(f"{r['name']:24s} s{r['seed']} greedy {r['greedy_eval_accuracy']} reward {r['mean_reward_by_third']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
