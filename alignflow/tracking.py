"""The one module that talks to MLflow. Stages call `stage_run(...)` and log through the returned object.

Embedded mode: a SQLite store at `<root>/mlflow.db`, artifacts under `<root>/mlruns`. Scaled mode: set
MLFLOW_TRACKING_URI (an `http://` server). Under `alignflow run` the pipeline's parent run id arrives in
ALIGNFLOW_PARENT_RUN_ID and each stage becomes a nested run; under a plain `dvc repro` each stage logs a
run of its own with the same tags. Every run carries its lineage: git commit, the dvc.lock hashes of its
inputs, its resolved config and its datasets.
"""
from __future__ import annotations

import json
import re
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # log_model otherwise spends ~50 s on hub lookups
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from alignflow import versioning

try:
    if os.environ.get("ALIGNFLOW_TRACKING") == "file":
        raise ImportError("file tracking requested")
    import mlflow
    from mlflow import MlflowClient
except ImportError:  # a GPU box with only torch + transformers: record to a local file, import it later
    mlflow = None

PARENT_ENV = "ALIGNFLOW_PARENT_RUN_ID"
_file_run: "FileRun | None" = None


class FileRun:
    """Stand-in for an MLflow run where mlflow is not installed: every call becomes a JSON line in
    <root>/.alignflow/tracking/<run_id>.jsonl; `alignflow import-tracking` replays them into MLflow."""

    def __init__(self, root: Path, pipeline: str, stage: str, tags: dict):
        import time
        import uuid
        self.info = type("Info", (), {"run_id": uuid.uuid4().hex})()
        self.path = root / ".alignflow" / "tracking" / f"{self.info.run_id}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write("start", pipeline=pipeline, stage=stage, tags=tags, time=time.time())

    def write(self, kind: str, **payload) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"kind": kind, **payload}, default=str) + "\n")


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def setup(root: Path, pipeline: str) -> str:
    mlflow.set_tracking_uri(tracking_uri(root))
    name = f"alignflow-{pipeline}"
    if mlflow.get_experiment_by_name(name) is None and tracking_uri(root).startswith("sqlite"):
        mlflow.create_experiment(name, artifact_location=(root / "mlruns").resolve().as_uri())
    mlflow.set_experiment(name)
    return name


def git_commit(root: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


@contextmanager
def pipeline_run(root: Path, pipeline: str, overrides: list[str], config: dict):
    """The parent run of a whole pipeline run: each stage's run nests under it (PARENT_ENV tells the stage
    processes its id)."""
    setup(root, pipeline)
    with mlflow.start_run(run_name=f"post_training-{pipeline}",
                          tags={"alignflow.pipeline": pipeline, "git_commit": git_commit(root)}) as parent:
        mlflow.log_params({"pipeline": pipeline, "overrides": " ".join(overrides)})
        mlflow.log_dict(config, "config/pipeline.json")
        os.environ[PARENT_ENV] = parent.info.run_id
        try:
            yield parent
        finally:
            os.environ.pop(PARENT_ENV, None)


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else value
    return flat


@contextmanager
def stage_run(root: Path, pipeline: str, stage: str, config: dict, inputs: list[str]):
    """Open the stage's MLflow run (nested under the pipeline run when there is one) with its lineage."""
    global _file_run
    parent = os.environ.get(PARENT_ENV)
    tags = {"alignflow.pipeline": pipeline, "alignflow.stage": stage, "git_commit": git_commit(root),
            "alignflow.launcher": "alignflow run" if parent else "dvc repro"}
    if mlflow is None:
        _file_run = FileRun(root, pipeline, stage, tags)
        _file_run.write("params", config=config, inputs=versioning.lock_hashes(root, inputs))
        try:
            yield _file_run
        finally:
            _file_run.write("end")
            _file_run = None
        return
    setup(root, pipeline)
    with mlflow.start_run(run_name=stage, parent_run_id=parent, tags=tags) as run:
        mlflow.log_params(_flatten(config))
        mlflow.log_dict(config, f"config/{stage}.json")
        hashes = versioning.lock_hashes(root, inputs)
        mlflow.log_dict(hashes, "lineage/inputs.json")
        mlflow.set_tags({f"dvc.input.{p}": h for p, h in hashes.items()})
        yield run


def metric_name(key: str) -> str:
    """An MLflow-legal metric name: it allows alphanumerics, _ - . / : and spaces, so `pass@4` becomes `pass_at_4`."""
    key = key.replace("@", "_at_")
    return re.sub(r"[^A-Za-z0-9_\-./: ]", "_", key)


def log_metrics(metrics: dict, step: int | None = None) -> None:
    numbers = {metric_name(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if _file_run is not None:
        return _file_run.write("metrics", metrics=numbers, step=step)
    mlflow.log_metrics(numbers, step=step)


def log_dataset(path: Path, name: str, context: str) -> None:
    if _file_run is not None:
        return _file_run.write("dataset", path=str(path), name=name, context=context)
    import pandas as pd
    df = pd.read_parquet(path)
    mlflow.log_input(mlflow.data.from_pandas(df, source=str(path), name=name), context=context)


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    if _file_run is not None:
        return _file_run.write("artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)
    if Path(path).is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_table(rows: list[dict], artifact_file: str) -> None:
    """Rows of a table (e.g. prompts and completions) as an MLflow table artifact (mlflow.log_table: the UI shows
    it under the run's artifacts and in its evaluation view)."""
    if not rows:
        return
    if _file_run is not None:
        return _file_run.write("table", rows=rows, artifact_file=artifact_file)
    import pandas as pd
    mlflow.log_table(pd.DataFrame(rows), artifact_file)


def register_policy(model_dir: Path, registered_name: str, alias: str, tags: dict) -> str:
    """Log a transformers model (as objects: a path crashes on transformers 5) and point `alias` at it.
    The version the alias pointed at before keeps alias `previous`. Returns the new version."""
    from alignflow.models import load
    model, tokenizer = load(model_dir)
    info = mlflow.transformers.log_model(transformers_model={"model": model, "tokenizer": tokenizer},
                                         name="policy", task="text-generation",
                                         pip_requirements=["torch==2.13.0", "transformers==5.24.0"],
                                         registered_model_name=registered_name)
    client = MlflowClient()
    version = str(info.registered_model_version)
    try:
        current = client.get_model_version_by_alias(registered_name, alias)
        if current.version != version:
            client.set_registered_model_alias(registered_name, "previous", current.version)
    except mlflow.exceptions.MlflowException:
        pass  # first champion
    client.set_registered_model_alias(registered_name, alias, version)
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, str(value))
    return version


def current_alias(registered_name: str, alias: str):
    """(version, tags) of the model version an alias points at, or None."""
    try:
        mv = MlflowClient().get_model_version_by_alias(registered_name, alias)
    except mlflow.exceptions.MlflowException:
        return None
    return mv.version, dict(mv.tags)


def load_registered(registered_name: str, alias: str, into: Path) -> Path | None:
    """The model version an alias points at, saved as a model directory (None when the alias is unset)."""
    if current_alias(registered_name, alias) is None:
        return None
    from alignflow.models import save
    comps = mlflow.transformers.load_model(f"models:/{registered_name}@{alias}", return_type="components")
    save(comps["model"], comps["tokenizer"], into)
    return into


def import_file_runs(root: Path, pipeline_filter: str | None = None) -> int:
    """Replay runs recorded by FileRun (on a machine without mlflow) into the MLflow store; returns how many."""
    count = 0
    for path in sorted((root / ".alignflow" / "tracking").glob("*.jsonl")):
        events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        start = events[0]
        if pipeline_filter and start["pipeline"] != pipeline_filter:
            continue
        setup(root, start["pipeline"])
        with mlflow.start_run(run_name=start["stage"], tags={**start["tags"], "alignflow.imported_from": path.name}):
            for event in events[1:]:
                if event["kind"] == "params":
                    mlflow.log_params(_flatten(event["config"]))
                    mlflow.log_dict(event["inputs"], "lineage/inputs.json")
                elif event["kind"] == "metrics":
                    mlflow.log_metrics(event["metrics"], step=event["step"])
                elif event["kind"] == "table":
                    log_table(event["rows"], event["artifact_file"])
                elif event["kind"] == "artifact" and Path(event["path"]).exists():
                    log_artifact(Path(event["path"]), event["artifact_path"])
        path.rename(path.with_suffix(".imported"))
        count += 1
    return count
