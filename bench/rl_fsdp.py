"""RL steps of a user-shaped model (bench/make_shape.py) on 1..N GPUs of one host, DDP or FSDP2 (issue 20).

    python bench/rl_fsdp.py --model models/shapes/qwen2.5-0.5b --strategy fsdp --gpus 1 2 4 8 --out bench/results/rl_fsdp_0.5b.json
    python bench/rl_fsdp.py --model models/shapes/qwen2.5-7b --strategy fsdp --gpus 4 --out bench/results/rl_fsdp_7b.json

Each count runs the RL loop the stage runs (alignflow.train.rl.train_candidate: GRPO, bf16, the static engine,
the arithmetic task's prompts, `--prompts` prompts x 8 completions per step as the global batch) under
`torchrun --nproc_per_node N` (one process for N = 1); throughput is completions per second of the steps after the
first `--warmup` (compilation, graph capture, allocator warm-up), peak memory the largest of the ranks' allocator
peaks. JSON: n_gpus, speedup_vs_1gpu (when a 1-GPU run is in the list), strategy, parameters, peak_memory_gib,
device, and every run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_run(args) -> None:
    """Under torchrun (or alone): train, then rank 0 writes this run's figures to --run-out."""
    import torch

    from alignflow import models
    from alignflow.config import CandidateConfig, ParallelConfig, RLConfig
    from alignflow.data.rows import TaskRows
    from alignflow.data.task import generate
    from alignflow.rewards import accuracy_reward
    from alignflow.train import distributed
    from alignflow.train.rl import train_candidate
    with distributed.process_group():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tok = models.load(args.model, device)
        parameters = sum(p.numel() for p in model.parameters())
        rows = generate(seed=0, n_sft=10, n_rl=2000, n_logged=10, n_eval=10, n_ood=10, n_real=10, n_corpus=10)["rl"]
        prompts = TaskRows.from_texts([r["prompt"] for r in rows], answer=[r["answer"] for r in rows])
        cfg = RLConfig(prompts_per_step=args.prompts, group_size=8, max_new_tokens=args.max_new_tokens,
                       engine=args.engine, precision="bf16", micro_batch_size=args.micro or None,
                       checkpoint_every=10 ** 6, parallel=ParallelConfig(strategy=args.strategy,
                                                                        activation_checkpointing=args.ac))
        cand = CandidateConfig(name="bench", seeds=[0], steps=args.steps, checkpoints=[args.steps], lr=1e-6)
        steps = []
        started = time.time()
        train_candidate(model, tok, cand, 0, cfg, prompts, None, Path(args.run_out).with_suffix(".ckpt"),
                        on_log=lambda step, m: steps.append(m), reward_fn=accuracy_reward)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else 0.0
        peaks = distributed.all_gather_objects(peak)
        if distributed.is_main():
            steady = [m["step_seconds"] for m in steps[args.warmup:]] or [m["step_seconds"] for m in steps]
            mean = sum(steady) / len(steady)
            per_step = args.prompts * 8
            Path(args.run_out).write_text(json.dumps({
                "n_gpus": distributed.world_size(), "strategy": args.strategy, "parameters": parameters,
                "peak_memory_gib": round(max(peaks), 2), "peak_memory_gib_per_rank": [round(p, 2) for p in peaks],
                "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                "completions_per_step": per_step, "steady_step_seconds": round(mean, 4),
                "completions_per_s": round(per_step / mean, 1), "wall_seconds": round(time.time() - started, 1),
                "phase_seconds": {k: round(sum(m[f"{k}_seconds"] for m in steps[args.warmup:] or steps)
                                           / len(steps[args.warmup:] or steps), 4)
                                  for k in ("rollout", "update", "sync")},
                "reward": [round(m["reward"], 4) for m in steps]}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a save_pretrained folder (bench/make_shape.py)")
    ap.add_argument("--strategy", choices=["ddp", "fsdp"], default="fsdp")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--prompts", type=int, default=128, help="prompts per step (x 8 completions), the global batch")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--micro", type=int, default=0, help="rl.micro_batch_size (0: the whole batch per forward)")
    ap.add_argument("--engine", default="static")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing")
    ap.add_argument("--out", default=str(ROOT / "bench/results/rl_fsdp.json"))
    ap.add_argument("--run-out", help=argparse.SUPPRESS)   # set for the child runs
    args = ap.parse_args()
    if args.run_out:
        one_run(args)
        return 0
    runs = []
    for n in args.gpus:
        run_out = Path(args.out).with_name(f"{Path(args.out).stem}_{n}gpu.run.json")
        launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(n)]
        child = [*launcher, __file__, *sys.argv[1:], "--run-out", str(run_out)]
        code = subprocess.run(child, cwd=ROOT).returncode
        runs.append(json.loads(run_out.read_text()) if code == 0 and run_out.exists()
                    else {"n_gpus": n, "strategy": args.strategy, "failed": f"exit code {code}"})
    done = [r for r in runs if "failed" not in r]
    single = next((r for r in done if r["n_gpus"] == 1), None)
    for r in done:
        r["speedup_vs_1gpu"] = round(r["completions_per_s"] / single["completions_per_s"], 3) if single else None
    widest = max(done, key=lambda r: r["n_gpus"]) if done else runs[-1]
    out = {key: widest.get(key) for key in ("n_gpus", "speedup_vs_1gpu", "strategy", "parameters",
                                            "peak_memory_gib", "device")}
    out.update(model=args.model, runs=runs, command="python bench/rl_fsdp.py " + " ".join(sys.argv[1:]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
