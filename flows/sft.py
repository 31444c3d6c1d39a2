"""sft: supervised fine-tuning on the demonstrations, chat template applied, loss on response tokens only.
Stops once the greedy validation score (the pipeline's reward) reaches `sft.stop_at_score` (leaves room for RL to show).

    dvc repro sft@tiny     or     alignflow stage sft --pipeline tiny
"""
from prefect import flow

from tasks.common import open_stage, publish_summary, tracked, write_metrics
from tasks.train import clear_checkpoints, supervised_finetune


@flow(name="sft", flow_run_name="sft-{pipeline}", log_prints=True)
def sft(pipeline: str = "tiny") -> dict:
    ctx = open_stage("sft", pipeline, inputs=["curated", "base"])
    with tracked(ctx, ctx.cfg.sft.model_dump()) as run:
        metrics = supervised_finetune(ctx)
        write_metrics(ctx, metrics, curve_name="sft_curve")
        publish_summary(ctx, run.info.run_id, f"validation score {metrics.get('val_score', float('nan')):.3f}", [metrics])
    clear_checkpoints(ctx)
    return metrics
