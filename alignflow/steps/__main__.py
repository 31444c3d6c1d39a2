"""Run one stage with only PyTorch and transformers installed (a GPU box): no Prefect, DVC or MLflow.

    python -m alignflow.steps base --pipeline gpu
    python -m alignflow.steps sft --pipeline gpu
    python -m alignflow.steps rl --pipeline gpu
    python -m alignflow.steps scores --pipeline gpu     # true values of base, SFT and every candidate
    torchrun --nproc_per_node 2 -m alignflow.steps rl --pipeline gpu   # the RL stage on 2 GPUs (DDP)

Same steps as the Prefect flows (alignflow/steps/*); tracking goes to .alignflow/tracking/*.jsonl when
mlflow is missing, and `alignflow import-tracking` loads it into MLflow later. The curated splits come
from the `curate` stage run elsewhere (carry data/<pipeline>/curated).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from alignflow.layout import write_json
from alignflow.stage import open_stage, read_split, tracked, write_metrics
from alignflow.steps import policies, train
from alignflow.train import distributed


def _rl(ctx) -> dict:
    candidates = []
    for i, cand in enumerate(ctx.cfg.rl.candidates):
        for seed in cand.seeds:
            candidates += train.train_rl_candidate(ctx, i, seed)
    return {"candidates": candidates}


def _scores(ctx) -> dict:
    import pandas as pd
    splits = {name: read_split(ctx.layout.curated, name) for name in ("eval", "ood")}
    policies_dirs = {"base": ctx.layout.base, **policies.candidate_dirs(ctx.layout)}
    values = {}
    for name, path in policies_dirs.items():
        values[name], _ = policies.true_values(path, splits, splits["eval"], ctx.cfg.evaluate.value_samples,
                                               ctx.cfg.evaluate.max_new_tokens, ctx.cfg.evaluate.batch_size, ctx.cfg.seed)
        print(name, json.dumps(values[name]), flush=True)
    return {"policies": values}


STEPS = {
    "base": (["curated"], lambda ctx: train.pretrain_base(ctx), "base_curve"),
    "sft": (["curated", "base"], lambda ctx: train.supervised_finetune(ctx), "sft_curve"),
    "rl": (["curated", "sft"], _rl, "rl_curve"),
    "scores": (["curated", "base", "sft", "rl"], _scores, None),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignflow.steps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=sorted(STEPS))
    parser.add_argument("--pipeline", default="tiny")
    args = parser.parse_args(argv)
    inputs, fn, curve = STEPS[args.stage]
    with distributed.process_group():
        if distributed.world_size() > 1 and args.stage != "rl":
            raise SystemExit(f"only the rl step runs on several ranks; run {args.stage!r} without torchrun")
        ctx = open_stage(args.stage if args.stage != "scores" else "evaluate", args.pipeline, inputs=inputs)
        if not distributed.is_main():  # the other ranks train; rank 0 tracks and writes
            fn(ctx)
            return 0
        return _run_tracked(ctx, args.stage, fn, curve)


def _peak_gpu_memory() -> dict:
    """The stage's peak GPU memory (torch's allocator, this process), when it ran on CUDA."""
    import torch
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)}


def _run_tracked(ctx, stage: str, fn, curve: str | None) -> int:
    started = time.time()
    stage_cfg = getattr(ctx.cfg, ctx.name)
    with tracked(ctx, stage_cfg.model_dump()):
        metrics = fn(ctx)
        metrics["seconds"] = round(time.time() - started, 1)
        metrics.update(_peak_gpu_memory())
        if distributed.world_size() > 1:
            metrics["world_size"] = distributed.world_size()
        if stage == "scores":
            write_json(ctx.layout.metrics / "device_scores.json", metrics)
        else:
            write_metrics(ctx, metrics, curve_name=curve)
    if stage in ("base", "sft", "rl"):
        train.clear_checkpoints(ctx)
    print(json.dumps({k: v for k, v in metrics.items() if k != "policies"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
