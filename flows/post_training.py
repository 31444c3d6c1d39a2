"""post_training: the whole chain, stage by stage, through DVC, so a stage whose inputs did not change is
skipped (whichever way the pipeline was started: this flow, or `dvc repro` from the shell).

Overrides (`-S key.path=value`) are validated against the config model first, then written into
pipelines.yaml by DVC's own override code (the mechanism behind `dvc exp run -S`), so DVC sees each
change as a params change and never skips a stage on stale outputs.
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_table_artifact

from alignflow import tracking, versioning
from alignflow.config import ConfigError, load_project
from alignflow.layout import Layout, find_root
from alignflow.stage import STAGES
from flows import ensure_prefect_api
from flows import dispatch as scaled  # [scaled mode] stages as deployments on workers (docs/scaling.md)
from tasks.retry import stage_task


def check_request(root: Path, pipeline: str, overrides: list[str]) -> None:
    """Raise ConfigError unless the pipeline is tracked and the overrides give a valid config."""
    project = load_project(root / "pipelines.yaml")
    if pipeline not in project.tracked:
        raise ConfigError(f"--pipeline {pipeline!r} is not in `tracked` of pipelines.yaml ({project.tracked}); "
                          "add it there so dvc.yaml instantiates its stages")
    if overrides:
        apply_overrides(root, pipeline, overrides, dry_run=True)


def apply_overrides(root: Path, pipeline: str, overrides: list[str], dry_run: bool = False) -> None:
    """`pipelines.<pipeline>.<key>=value` overrides, validated (ConfigError names the key and what is allowed)."""
    versioning.apply_overrides(root, pipeline, overrides, validate=load_project, dry_run=dry_run)


def preflight(root: Path, pipeline: str) -> None:
    """Model, rewards and data checked before any stage runs (alignflow/preflight.py)."""
    from alignflow import preflight as checks
    problems, _ = checks.check(root, pipeline, load_project(root / "pipelines.yaml").pipelines[pipeline])
    if problems:
        raise ConfigError("pre-flight failed (alignflow check-config --pipeline " + pipeline + "):\n  "
                          + "\n  ".join(problems))


reproduce = stage_task(versioning.reproduce)  # `dvc repro -s <target>`: runs only if deps, params or outs changed


@flow(name="post_training", flow_run_name="post-training-{pipeline}", log_prints=True)
def post_training(pipeline: str = "tiny", overrides: list[str] | None = None) -> dict:
    root = find_root()
    check_request(root, pipeline, overrides or [])
    if overrides:
        apply_overrides(root, pipeline, overrides)
    preflight(root, pipeline)
    project = load_project(root / "pipelines.yaml")
    dispatch = scaled.scaled_mode()  # [scaled mode] decided before the embedded API URL is set below
    ensure_prefect_api()  # embedded: the stage processes DVC starts report to this process's API
    ran: dict[str, list[str]] = {}
    with tracking.pipeline_run(root, pipeline, overrides or [], project.pipelines[pipeline].model_dump()):
        reproduce(root, f"external@{pipeline}")  # fingerprints what DVC cannot see (alignflow/fingerprint.py)
        for stage in STAGES:
            ran[stage] = (scaled.dispatch(root, stage, pipeline) if dispatch  # [scaled mode]
                          else reproduce(root, f"{stage}@{pipeline}"))
            print(f"{stage}: {'ran' if ran[stage] else 'up to date, skipped'}")
        evaluate_json = Layout(root, pipeline).metrics_file("evaluate")
        if evaluate_json.exists():  # the headline figures on the parent run too
            tracking.log_artifact(evaluate_json, "metrics")
            for name, values in json.loads(evaluate_json.read_text())["policies"].items():
                tracking.log_metrics({f"{name}.{k}": v for k, v in values.items()})
    create_table_artifact(key=f"post-training-{pipeline}".replace("_", "-"),
                          table=[{"stage": s, "ran": bool(r)} for s, r in ran.items()])
    return ran
