"""Run one stage with only PyTorch and transformers installed (a GPU box): no Prefect, DVC or MLflow.

    python -m alignflow.steps base --pipeline gpu
    python -m alignflow.steps sft --pipeline gpu
    python -m alignflow.steps rl --pipeline gpu
    python -m alignflow.steps scores --pipeline gpu     # true values of base, SFT and every candidate
    torchrun --nproc_per_node 2 -m alignflow.steps rl --pipeline gpu   # the RL stage on 2 GPUs (DDP)

The same stage table and `run_stage` as the Prefect flows (alignflow/stage.py); tracking goes to
.alignflow/tracking/*.jsonl when mlflow is missing, and `alignflow import-tracking` loads it into MLflow later.
The curated splits come from the `curate` stage run elsewhere (carry data/<pipeline>/curated).
`scores` is evaluate's true values alone (no OPE inputs needed), written to reports/<p>/device_scores.json.
"""
from __future__ import annotations

import argparse
import json
import sys

from alignflow.layout import write_json
from alignflow.stage import STAGES, open_stage, run_stage
from alignflow.train import distributed


def scores(pipeline: str) -> dict:
    from alignflow.steps.evaluate import policy_values, splits
    from alignflow.steps.policies import candidate_dirs
    ctx = open_stage("evaluate", pipeline, inputs=list(STAGES["evaluate"].inputs))
    layout = ctx.layout
    values, _ = policy_values(ctx, splits(layout.curated), {"base": layout.base, **candidate_dirs(layout)})
    write_json(layout.device_scores, {"policies": values})
    return {"policies": values}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignflow.steps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=[*STAGES, "scores"])
    parser.add_argument("--pipeline", default="tiny")
    args = parser.parse_args(argv)
    with distributed.process_group():
        metrics = scores(args.pipeline) if args.stage == "scores" else run_stage(args.stage, args.pipeline)
    if distributed.is_main():
        print(json.dumps(metrics, default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
