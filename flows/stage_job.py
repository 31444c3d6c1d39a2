"""Scaled mode, the worker side: the flow `dvc-stage` that deployment `dvc-stage/<stage>` runs in the stage's pool.
In the worker's checkout of the project it runs exactly what the embedded mode runs, framed by the DVC remote:

    git checkout <rev>  ->  write the small git-side files  ->  dvc pull  ->  dvc repro -s <stage>@<pipeline>
                        ->  dvc push  ->  return dvc.lock + the stage's uncached metrics/plots

Large outputs (data, models) travel through the DVC remote, runs and models through the MLflow server; the
small files that git would carry (pipelines.yaml, dvc.lock, `cache: false` metrics and plots) travel in the
flow run's parameters and result, so neither side needs a commit per stage (flows/dispatch.py writes them back).
"""
from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import re
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from prefect import flow

from alignflow import versioning
from alignflow.layout import atomic_path
from alignflow.stage import STAGES

JOB_FLOW = "dvc-stage"
PARENT_ENV = "ALIGNFLOW_PARENT_RUN_ID"  # same name as alignflow.tracking.PARENT_ENV (not imported: mlflow)


# ---------------------------------------------------------------- git-side files
def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def carried_paths(root: Path, pipeline: str, stage: str | None = None) -> list[str]:
    """pipelines.yaml, dvc.lock and the `cache: false` outs (metrics, plots) of the pipeline's stages
    (of one stage if given): the files git would carry between machines."""
    uncached = versioning.uncached_outs(root, pipeline, stage)
    return ["dvc.lock", *uncached] if stage else ["pipelines.yaml", "dvc.lock", *uncached]


def read_files(root: Path, paths: list[str]) -> dict[str, str | None]:
    """{path: text} (None: absent, so the other side deletes its stale copy; bytes go as `base64:`)."""
    out: dict[str, str | None] = {}
    for rel in paths:
        path = root / rel
        if not path.is_file():
            out[rel] = None
            continue
        data = path.read_bytes()
        try:
            out[rel] = data.decode("utf-8")
        except UnicodeDecodeError:
            out[rel] = "base64:" + base64.b64encode(data).decode()
    return out


def write_files(root: Path, files: dict[str, str | None]) -> None:
    root = root.resolve()
    for rel, text in files.items():
        path = (root / rel).resolve()
        if root not in path.parents:  # parameters come from the API: never write outside the checkout
            raise ValueError(f"refusing to write {rel!r} outside {root}")
        if text is None:
            path.unlink(missing_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        data = base64.b64decode(text[7:]) if text.startswith("base64:") else text.encode("utf-8")
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)


# ---------------------------------------------------------------- the worker side
@contextmanager
def _locked(path: Path):
    """One stage job at a time per checkout (two runs of one pipeline on one worker queue here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _at(path: Path, env: dict[str, str] | None = None):
    before, saved = Path.cwd(), {k: os.environ.get(k) for k in (env or {})}
    os.chdir(path)
    os.environ.update({k: v for k, v in (env or {}).items() if v is not None})
    try:
        yield
    finally:
        os.chdir(before)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _checkout_dir(repo: str, pipeline: str) -> Path:
    base = Path(os.environ.get("ALIGNFLOW_WORK_DIR") or Path.home() / ".cache" / "alignflow" / "work")
    return base.resolve() / f"{hashlib.sha1(repo.encode()).hexdigest()[:8]}-{pipeline}"


def checkout(repo: str, rev: str, pipeline: str) -> Path:
    """The worker's persistent checkout for (repo, pipeline) at `rev`: outputs and resume checkpoints of
    earlier runs stay (ignored by git), so an unchanged input is not downloaded twice and a killed stage
    resumes. ALIGNFLOW_WORK_DIR (set by `alignflow infra up`) says where checkouts live."""
    if rev.startswith("-") or repo.startswith("-"):  # parameters come from the API: no git options
        raise ValueError(f"refusing repo {repo!r} / rev {rev!r}")
    work = _checkout_dir(repo, pipeline)
    if not (work / ".git").exists():
        work.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "-q", "--no-checkout", "--", repo, str(work)], check=True,
                       capture_output=True, text=True)
    try:
        _git(work, "cat-file", "-e", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        _git(work, "fetch", "-q", "origin")
        try:
            _git(work, "cat-file", "-e", f"{rev}^{{commit}}")
        except subprocess.CalledProcessError:
            _git(work, "fetch", "-q", "origin", rev)  # a commit no branch points at
    _git(work, "checkout", "-q", "--force", "--detach", rev)
    return work


def configure_remote(work: Path) -> None:
    """Point the checkout at ALIGNFLOW_DVC_REMOTE (per machine); without it the project's own default remote
    (committed in .dvc/config) is used."""
    if os.environ.get("ALIGNFLOW_DVC_REMOTE"):
        versioning.set_remote(work, os.environ["ALIGNFLOW_DVC_REMOTE"], os.environ.get("ALIGNFLOW_DVC_REMOTE_ENDPOINT"))


@flow(name=JOB_FLOW, flow_run_name="{stage}-{pipeline}-job", persist_result=True, log_prints=True)
def dvc_stage(stage: str, pipeline: str = "tiny", repo: str | None = None, rev: str | None = None,
              files: dict[str, str | None] | None = None, parent_run_id: str | None = None) -> dict:
    """One DVC stage on this worker: dvc pull -> dvc repro -s <stage>@<pipeline> -> dvc push.
    Without `repo` it runs in the current project (a worker sharing the parent's disk)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
    target, t = f"{stage}@{pipeline}", {}
    start = time.perf_counter()
    if repo:
        work = _checkout_dir(repo, pipeline)
        lock = work.with_name(f".{work.name}.lock")
    else:
        from alignflow.layout import find_root
        work = find_root()
        lock = work / ".dvc" / "tmp" / "alignflow-stage.lock"
    with _locked(lock):
        if repo:
            work = checkout(repo, rev or "HEAD", pipeline)
        write_files(work, files or {})
        configure_remote(work)
        t["checkout_s"] = time.perf_counter() - start
        os.environ.pop("ALIGNFLOW_ROOT", None)  # the stage finds its root from the cwd: this checkout
        with _at(work, {PARENT_ENV: parent_run_id}):
            ran = versioning.pull_repro_push(work, target, t)
        back = read_files(work, carried_paths(work, pipeline, stage))
    t["job_s"] = time.perf_counter() - start
    timings = {k: round(v, 2) for k, v in t.items()}
    print(f"{target}: {'ran' if ran else 'up to date'} in {work} on {socket.gethostname()} {timings}")
    from prefect.artifacts import create_table_artifact
    create_table_artifact(key=re.sub(r"[^a-z0-9-]+", "-", f"dvc-stage-{stage}-{pipeline}".lower()),
                          table=[{"stage": target, "ran": bool(ran), "host": socket.gethostname(), **timings}],
                          description="where the time of this stage job went (seconds)")
    return {"stage": stage, "ran": ran, "files": back, "timings": timings, "workdir": str(work),
            "host": socket.gethostname()}
