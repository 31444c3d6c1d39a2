"""Stage plumbing as seen from Prefect: each step a stage runs becomes a Prefect task (retried on transient
errors, tasks/retry.py), and each stage's summary becomes UI artifacts."""
from __future__ import annotations

from functools import cache

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from alignflow import tracking
from alignflow.stage import StageContext
from tasks.retry import stage_task


@cache
def as_task(fn):
    """The Prefect task of a step function (one per function, so the UI groups its runs)."""
    return stage_task(fn)


def publish_summary(ctx: StageContext, run_id: str, headline: str, table: list[dict]) -> None:
    """Prefect UI artifacts with stable keys, so each stage shows its history."""
    key = f"{ctx.name}-{ctx.pipeline}".lower().replace("_", "-")
    uri = tracking.tracking_uri(ctx.root)
    create_markdown_artifact(key=f"{key}-summary", markdown=(
        f"## {ctx.name} @ {ctx.pipeline}\n\n{headline}\n\nMLflow run `{run_id}` ({uri})"))
    if table:
        create_table_artifact(key=f"{key}-metrics", table=table)
