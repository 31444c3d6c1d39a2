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

GRID = [  # name, algorithm, lr, warmup steps, temperature, prompts_per_step, ppo_epochs, hparams
    ("grpo-lr1e-5", "grpo", 1e-5, 0, 1.0, 16, 1, {}),
    ("grpo-lr2e-5", "grpo", 2e-5, 20, 1.0, 16, 1, {}),
    ("grpo-lr1e-5-t0.5", "grpo", 1e-5, 0, 0.5, 16, 1, {}),
    ("grpo-lr2e-5-t0.5", "grpo", 2e-5, 20, 0.5, 16, 1, {}),
    ("grpo-lr1e-5-t0.5-p8", "grpo", 1e-5, 0, 0.5, 8, 1, {}),
    ("grpo-lr1e-5-ep4", "grpo", 1e-5, 0, 1.0, 16, 4, {}),
    ("grpo-lr1e-5-t0.5-ep4", "grpo", 1e-5, 0, 0.5, 16, 4, {}),
    ("dr_grpo-lr1e-5-t0.5", "dr_grpo", 1e-5, 0, 0.5, 16, 1, {}),
    ("grpo-lr5e-6-t0.5-ep4", "grpo", 5e-6, 0, 0.5, 16, 4, {}),
    ("grpo-lr2e-5-t0.7-ep2", "grpo", 2e-5, 20, 0.7, 16, 2, {}),
]


def run_one(args) -> dict:
    name, algo, lr, warmup, temp, prompts_per_step, ppo_epochs, hp, pipeline, steps, device, seed = args
    import torch
    from alignflow import models
    from alignflow.config import CandidateConfig, RLConfig
    from alignflow.data.rows import TaskRows
    from alignflow.evaluation import score
    from alignflow.rewards import RewardSet, accuracy_reward
    from alignflow.layout import Layout
    from alignflow.stage import read_split
    from alignflow.train import rl
    torch.set_num_threads(1)
    layout = Layout(ROOT, pipeline)
    rl_rows, eval_rows = read_split(layout.curated, "rl"), read_split(layout.curated, "eval")
    model, tok = models.load(layout.sft, device)
    checkpoints = [steps // 4, steps // 2, 3 * steps // 4, steps]
    cand = CandidateConfig(name="s", algorithm=algo, seeds=[seed], steps=steps, checkpoints=checkpoints, lr=lr,
                           warmup_steps=warmup, hparams=hp)
    extra = rl.ExtraModels(ref=models.load(layout.sft, device)[0].eval()) if hp.get("beta") else None
    rewards, started = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        rl.train_candidate(model, tok, cand, seed, RLConfig(prompts_per_step=prompts_per_step, temperature=temp,
                                                            ppo_epochs=ppo_epochs),
                           rl_rows["prompt"].tolist(), rl_rows["answer"].astype(str).tolist(), Path(tmp),
                           on_log=lambda s, m: rewards.append(m["reward"]), extra_models=extra)
        greedy = {}
        for c in checkpoints:
            snap, _ = models.load(Path(tmp) / "snapshots" / f"s-s{seed}-{c}", device)
            greedy[c] = score(snap, tok, TaskRows.from_frame(eval_rows), RewardSet.of(accuracy_reward))["value"]
    quarter = max(1, steps // 4)
    return {"name": name, "algorithm": algo, "lr": lr, "warmup_steps": warmup, "temperature": temp,
            "prompts_per_step": prompts_per_step, "ppo_epochs": ppo_epochs, "hparams": hp, "seed": seed,
            "greedy_eval_accuracy": greedy,
            "mean_reward_by_quarter": [round(sum(rewards[i:i + quarter]) / quarter, 3) for i in range(0, steps, quarter)],
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
    from alignflow.data.rows import TaskRows
    from alignflow.evaluation import score
    from alignflow.rewards import RewardSet, accuracy_reward
    from alignflow.layout import Layout
    from alignflow.stage import read_split
    layout = Layout(ROOT, args.pipeline)
    sft, tok = models.load(layout.sft, args.device)
    eval_rows = read_split(layout.curated, "eval")
    sft_greedy = score(sft, tok, TaskRows.from_frame(eval_rows), RewardSet.of(accuracy_reward))["value"]
    jobs = [(*g, args.pipeline, args.steps, args.device, seed) for seed in args.seeds for g in GRID]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        results = pool.map(run_one, jobs)
    out = {"pipeline": args.pipeline, "sft_greedy_eval_accuracy": sft_greedy, "steps": args.steps,
           "device": args.device, "runs": results, "command": "python bench/rl_sweep.py " + " ".join(sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"SFT greedy {sft_greedy:.3f}")
    for r in sorted(results, key=lambda r: -max(r["greedy_eval_accuracy"].values())):
        print(f"{r['name']:24s} s{r['seed']} greedy {r['greedy_eval_accuracy']} reward {r['mean_reward_by_quarter']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
