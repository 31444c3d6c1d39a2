"""base: the pre-trained model. For the embedded default, a tiny Qwen2 with a character tokenizer trained
from scratch on the corpus split; for a real model, the configured local path, copied as is.

    dvc repro base@tiny     or     alignflow stage base --pipeline tiny
"""
from prefect import flow

from tasks.common import open_stage, publish_summary, tracked, write_metrics
from tasks.train import clear_checkpoints, pretrain_base


@flow(name="base", flow_run_name="base-{pipeline}", log_prints=True)
def base(pipeline: str = "tiny") -> dict:
    ctx = open_stage("base", pipeline, inputs=["curated"])
    with tracked(ctx, ctx.cfg.base.model_dump()) as run:
        metrics = pretrain_base(ctx)
        write_metrics(ctx, metrics, curve_name="base_curve")
        publish_summary(ctx, run.info.run_id, f"base model: {metrics['parameters']:,} parameters", [metrics])
    clear_checkpoints(ctx)
    return metrics
