"""teacher: the model that on-policy distillation (opd, exopd) learns from, built in its own stage so `rl`
never depends on itself. SFT from the base model run to the end (stronger than the student's early-stopped
SFT), or a configured path; a marker folder when no candidate needs a teacher.

    dvc repro teacher@tiny     or     alignflow stage teacher --pipeline tiny
"""
from prefect import flow

from tasks.common import open_stage, publish_summary, tracked, write_metrics
from tasks.train import build_teacher, clear_checkpoints


@flow(name="teacher", flow_run_name="teacher-{pipeline}", log_prints=True)
def teacher(pipeline: str = "tiny") -> dict:
    ctx = open_stage("teacher", pipeline, inputs=["curated", "base"])
    with tracked(ctx, ctx.cfg.teacher.model_dump()) as run:
        metrics = build_teacher(ctx)
        write_metrics(ctx, metrics, curve_name="teacher_curve")
        publish_summary(ctx, run.info.run_id, "teacher built" if metrics["built"] else "no teacher needed", [metrics])
    clear_checkpoints(ctx)
    return metrics
