"""curate: raw files / saved HF datasets / the task generator -> normalised, deduplicated, GX-validated
Parquet splits; every rejected row goes to quarantine.jsonl with its file, line and reason.

    dvc repro curate@tiny     or     alignflow stage curate --pipeline tiny
"""
from prefect import flow

from alignflow.data import curate as core
from tasks.common import open_stage, publish_summary, stage_task, tracked, write_metrics


@stage_task
def curate_sources(ctx) -> dict:
    return core.curate(ctx.cfg.curate, ctx.layout.curated, ctx.root)  # {counts, unreadable}


@flow(name="curate", flow_run_name="curate-{pipeline}", log_prints=True)
def curate(pipeline: str = "tiny") -> dict:
    ctx = open_stage("curate", pipeline, inputs=[])
    with tracked(ctx, ctx.cfg.curate.model_dump()) as run:
        result = curate_sources(ctx)  # an empty required split raises, naming its files (the stage then fails)
        counts = result["counts"]
        for bad in result["unreadable"]:
            print(f"unreadable, set aside: {bad['path']}: {bad['problem']}")
        for split, why in {**result.get("missing_splits", {}), **result.get("derived_splits", {})}.items():
            print(f"split {split}: {why}")
        write_metrics(ctx, {**counts, "unreadable_files": len(result["unreadable"]),
                            "missing_splits": result.get("missing_splits", {}),
                            "derived_splits": result.get("derived_splits", {})})
        from alignflow import tracking
        for split in ("sft", "rl", "eval"):
            if (ctx.layout.curated / f"{split}.parquet").exists():
                tracking.log_dataset(ctx.layout.curated / f"{split}.parquet", f"{pipeline}-{split}", split)
        tracking.log_artifact(ctx.layout.curated / "quarantine.jsonl", "curate")
        tracking.log_artifact(ctx.layout.curated / "validation.json", "curate")
        publish_summary(ctx, run.info.run_id, f"{counts.get('quarantined', 0)} rows quarantined",
                        [{"split": k, "rows": v} for k, v in counts.items() if isinstance(v, int)])
    return result
