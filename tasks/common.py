"""Stage plumbing as seen from Prefect: the core's context and metrics (alignflow/stage.py) plus the UI
artifacts Prefect shows for each stage."""
from __future__ import annotations

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from alignflow import stage, tracking
from alignflow.stage import StageContext, open_stage, tracked  # noqa: F401  (the flows' imports)
from tasks.retry import stage_task

write_metrics = stage_task(stage.write_metrics)


@stage_task
def publish_summary(ctx: StageContext, run_id: str, headline: str, table: list[dict]) -> None:
    """Prefect UI artifacts with stable keys, so each stage shows its history."""
    key = f"{ctx.name}-{ctx.pipeline}".lower().replace("_", "-")
    uri = tracking.tracking_uri(ctx.root)
    create_markdown_artifact(key=f"{key}-summary", markdown=(
        f"## {ctx.name} @ {ctx.pipeline}\n\n{headline}\n\nMLflow run `{run_id}` ({uri})"))
    if table:
        create_table_artifact(key=f"{key}-metrics", table=table)
