"""post_training: the whole chain, stage by stage, through DVC, so a stage whose inputs did not change is
skipped (whichever way the pipeline was started: this flow, or `dvc repro` from the shell).

Overrides (`-S key.path=value`) are validated against the config model first, then written into
pipelines.yaml by DVC's own override code (the mechanism behind `dvc exp run -S`), so DVC sees each
change as a params change and never skips a stage on stale outputs.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlflow
import yaml
from prefect import flow
from prefect.artifacts import create_table_artifact

from alignflow import tracking
from alignflow.config import ConfigError, load_project
from alignflow.layout import find_root
from flows import STAGES
from flows import deploy as scaled  # [scaled mode] stages as deployments on workers (docs/scaling.md)
from tasks.retry import stage_task


@contextmanager
def at(root: Path):
    before = Path.cwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(before)


def check_request(root: Path, pipeline: str, overrides: list[str]) -> None:
    """Raise ConfigError unless the pipeline is tracked and the overrides give a valid config."""
    project = load_project(root / "pipelines.yaml")
    if pipeline not in project.tracked:
        raise ConfigError(f"--pipeline {pipeline!r} is not in `tracked` of pipelines.yaml ({project.tracked}); "
                          "add it there so dvc.yaml instantiates its stages")
    if overrides:
        apply_overrides(root, pipeline, overrides, dry_run=True)


def preflight(root: Path, pipeline: str) -> None:
    """Model, rewards and data checked before any stage runs (alignflow/preflight.py)."""
    from alignflow import preflight as checks
    problems, _ = checks.check(root, pipeline, load_project(root / "pipelines.yaml").pipelines[pipeline])
    if problems:
        raise ConfigError("pre-flight failed (alignflow check-config --pipeline " + pipeline + "):\n  "
                          + "\n  ".join(problems))


def _has_key(raw: dict, dotted: str) -> bool:
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def apply_overrides(root: Path, pipeline: str, overrides: list[str], dry_run: bool = False) -> None:
    """Validate `pipelines.<pipeline>.<key>=value` overrides on a copy, then let DVC write them."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides as dvc_apply

    raw = yaml.safe_load((root / "pipelines.yaml").read_text())
    full = []
    for item in overrides:
        key = f"pipelines.{pipeline}.{item.partition('=')[0]}"
        # a key left at its default is absent from the file: hydra adds it with "+" (the schema check below
        # still rejects keys the config model does not know)
        full.append(("" if _has_key(raw, key) else "+") + f"pipelines.{pipeline}.{item}")
    with tempfile.TemporaryDirectory() as tmp:
        trial = Path(tmp) / "pipelines.yaml"
        shutil.copy(root / "pipelines.yaml", trial)
        try:
            dvc_apply(trial, full)
        except InvalidArgumentError as err:
            cause = err.__cause__ or err
            raise ConfigError(f"-S {' '.join(overrides)}: {str(cause).splitlines()[0]}") from None
        load_project(trial)  # raises ConfigError naming the key and what is allowed
    if not dry_run:
        dvc_apply(root / "pipelines.yaml", full)


@stage_task
def reproduce(root: Path, target: str) -> list[str]:
    """`dvc repro -s <target>`: runs the stage only if its deps, params or outs changed."""
    from dvc.repo import Repo
    with at(root), Repo(str(root)) as repo:
        return [stage.addressing for stage in repo.reproduce(targets=[target], single_item=True)]


@flow(name="post_training", flow_run_name="post-training-{pipeline}", log_prints=True)
def post_training(pipeline: str = "tiny", overrides: list[str] | None = None) -> dict:
    root = find_root()
    check_request(root, pipeline, overrides or [])
    if overrides:
        apply_overrides(root, pipeline, overrides)
    preflight(root, pipeline)
    project = load_project(root / "pipelines.yaml")
    dispatch = scaled.scaled_mode()  # [scaled mode] decided before the embedded API URL is set below
    if not os.environ.get("PREFECT_API_URL"):  # embedded: stage processes report to this process's API
        from prefect.server.api.server import SubprocessASGIServer
        os.environ["PREFECT_API_URL"] = SubprocessASGIServer().api_url
    tracking.setup(root, pipeline)
    ran: dict[str, list[str]] = {}
    with mlflow.start_run(run_name=f"post_training-{pipeline}",
                          tags={"alignflow.pipeline": pipeline, "git_commit": tracking.git_commit(root)}) as parent:
        mlflow.log_params({"pipeline": pipeline, "overrides": " ".join(overrides or [])})
        mlflow.log_dict(project.pipelines[pipeline].model_dump(), "config/pipeline.json")
        os.environ[tracking.PARENT_ENV] = parent.info.run_id
        try:
            reproduce(root, f"external@{pipeline}")  # fingerprints what DVC cannot see (alignflow/fingerprint.py)
            for stage in STAGES:
                ran[stage] = (scaled.dispatch(root, stage, pipeline) if dispatch  # [scaled mode]
                              else reproduce(root, f"{stage}@{pipeline}"))
                print(f"{stage}: {'ran' if ran[stage] else 'up to date, skipped'}")
        finally:
            os.environ.pop(tracking.PARENT_ENV, None)
        evaluate_json = root / "metrics" / pipeline / "evaluate.json"
        if evaluate_json.exists():
            mlflow.log_artifact(str(evaluate_json), "metrics")
            import json
            result = json.loads(evaluate_json.read_text())
            for name, values in result["policies"].items():
                mlflow.log_metrics({f"{name}.{k}": v for k, v in values.items()})
    create_table_artifact(key=f"post-training-{pipeline}".replace("_", "-"),
                          table=[{"stage": s, "ran": bool(r)} for s, r in ran.items()])
    return ran
