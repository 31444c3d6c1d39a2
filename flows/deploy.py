"""Scaled mode: what a worker runs for one stage, how `post_training` sends a stage there, and how the
deployments of infra/prefect.yaml are created.

    python -m flows.deploy [--root .] [--prefect-file infra/prefect.yaml]     (`alignflow infra up` calls it)
    ALIGNFLOW_ROOT=$PWD prefect --no-prompt deploy --all --prefect-file infra/prefect.yaml   (same result)

A stage in scaled mode is the flow `dvc-stage` run by the deployment `dvc-stage/<stage>` in the stage's pool
(STAGE_POOLS). In the worker's checkout of the project it runs exactly what the embedded mode runs, framed by
the DVC remote:

    git checkout <rev>  ->  write the small git-side files  ->  dvc pull  ->  dvc repro -s <stage>@<pipeline>
                        ->  dvc push  ->  return dvc.lock + the stage's uncached metrics/plots

Large outputs (data, models) travel through the DVC remote, runs and models through the MLflow server; the
small files that git would carry (pipelines.yaml, dvc.lock, `cache: false` metrics and plots) travel in the
flow run's parameters and result, so neither side needs a commit per stage. The parent writes them back into
its own checkout, which ends up exactly as after an embedded run, minus the large outputs (`dvc pull` them).
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import hashlib
import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from prefect import flow

from alignflow import versioning
from alignflow.stage import STAGES
from tasks.retry import stage_task

JOB_FLOW = "dvc-stage"
STAGE_POOLS = {"curate": "cpu", "base": "cpu", "sft": "gpu", "teacher": "gpu", "rl": "gpu", "logged": "gpu",
               "ope": "cpu", "evaluate": "gpu"}  # infra/prefect.yaml deploys dvc-stage/<stage> to these pools
PARENT_ENV = "ALIGNFLOW_PARENT_RUN_ID"  # same name as alignflow.tracking.PARENT_ENV (not imported: mlflow)


class ScaledModeError(RuntimeError):
    """Scaled mode was asked for but cannot work as set up; the message says what to do."""


# ---------------------------------------------------------------- which mode
def scaled_mode() -> bool:
    """ALIGNFLOW_MODE=scaled: always dispatch; =embedded: never; unset/auto: dispatch when PREFECT_API_URL
    names a server that holds the stage deployments (`alignflow infra up` creates them)."""
    mode = os.environ.get("ALIGNFLOW_MODE", "auto").strip().lower() or "auto"
    if mode not in ("auto", "embedded", "scaled"):
        raise ScaledModeError(f"ALIGNFLOW_MODE={mode!r}: allowed: embedded, scaled, auto")
    if mode == "embedded" or (mode == "auto" and not os.environ.get("PREFECT_API_URL")):
        return False
    if mode == "auto" and not _has_stage_deployments():
        return False
    if not os.environ.get("PREFECT_API_URL"):
        raise ScaledModeError("ALIGNFLOW_MODE=scaled needs PREFECT_API_URL (a Prefect server with the stage "
                              "deployments): `alignflow infra up`, then `source .alignflow/infra/env.sh`")
    if not os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://", "databricks")):
        raise ScaledModeError("scaled mode needs MLFLOW_TRACKING_URI set to the MLflow server the workers log to "
                              "(stages run on other machines: a local sqlite store would split the runs)")
    return True


def _has_stage_deployments() -> bool:
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(f"{JOB_FLOW}/{next(iter(STAGES))}")
        return True
    except ObjectNotFound:
        return False


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
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)


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


# ---------------------------------------------------------------- the parent side
@stage_task(task_run_name="dispatch-{stage}")
def dispatch(root: Path, stage: str, pipeline: str) -> list[str]:
    """Run `dvc-stage/<stage>` on its pool's worker and wait; write back what it returns (dvc.lock, metrics)."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    rev = _git(root, "rev-parse", "HEAD")
    carried = carried_paths(root, pipeline)
    porcelain = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout
    dirty = [line[3:] for line in porcelain.splitlines() if line[3:] not in carried]
    if dirty:
        print(f"warning: uncommitted changes the workers will not see (they check out {rev[:10]}): {dirty}")
    params = {"stage": stage, "pipeline": pipeline, "repo": os.environ.get("ALIGNFLOW_GIT_URL") or str(root),
              "rev": rev, "files": read_files(root, carried), "parent_run_id": os.environ.get(PARENT_ENV)}
    timeout = float(os.environ["ALIGNFLOW_STAGE_TIMEOUT_S"]) if os.environ.get("ALIGNFLOW_STAGE_TIMEOUT_S") else None
    start = time.perf_counter()
    try:
        run = run_deployment(f"{JOB_FLOW}/{stage}", parameters=params, timeout=timeout, poll_interval=1)
    except ObjectNotFound:
        raise ScaledModeError(f"no deployment {JOB_FLOW}/{stage} on {os.environ.get('PREFECT_API_URL')}: add it to "
                              "infra/prefect.yaml and deploy (python -m flows.deploy)") from None
    wall = time.perf_counter() - start
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        raise ScaledModeError(f"stage {stage}@{pipeline}: flow run {run.name} ({run.id}) ended {state} in pool "
                              f"{run.work_pool_name}: {run.state.message if run.state else ''}; see its logs in the UI")
    result = run.state.result()
    write_files(root, result["files"])
    job = result["timings"]["job_s"]
    print(f"{stage}: flow run {run.name} in pool {run.work_pool_name} on {result['host']}: "
          f"{'ran' if result['ran'] else 'up to date'}; {wall:.1f} s wall, job {job:.1f} s "
          f"(repro {result['timings']['repro_s']:.1f} s), dispatch overhead {wall - job:.1f} s")
    return result["ran"]


# ---------------------------------------------------------------- a light flow: is a pool alive?
@flow(name="infra-check", flow_run_name="infra-check-{message}", log_prints=True, persist_result=True)
def infra_check(message: str = "ping", sleep_s: float = 0.0) -> dict:
    """Answers from whichever worker ran it: host, working directory, visible GPUs. (UI and load tests.)"""
    if sleep_s:
        time.sleep(sleep_s)
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    answer = {"message": message, "host": socket.gethostname(), "cwd": os.getcwd(), "pid": os.getpid(),
              "cuda_visible_devices": gpus}
    print(f"infra-check {message!r} from {answer['host']} (CUDA_VISIBLE_DEVICES={gpus})")
    return answer


# ---------------------------------------------------------------- deploying
def load_prefect_yaml(path: Path) -> list[dict]:
    import yaml
    return yaml.safe_load(path.read_text())["deployments"]


def deploy_all(root: Path, prefect_file: str = "infra/prefect.yaml", names: list[str] | None = None) -> list[str]:
    """`flow.from_source(root, entrypoint).deploy(...)` for each deployment in prefect.yaml: the same set
    `prefect deploy --all --prefect-file infra/prefect.yaml` creates, without its prompts."""
    from prefect import flow as prefect_flow
    from prefect.schedules import Cron

    root = Path(root).resolve()
    done = []
    for spec in load_prefect_yaml(root / prefect_file):
        if names and spec["name"] not in names:
            continue
        loaded = prefect_flow.from_source(source=str(root), entrypoint=spec["entrypoint"])
        schedules = [Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
                     for s in spec.get("schedules") or []]
        loaded.deploy(name=spec["name"], work_pool_name=spec["work_pool"]["name"],
                      job_variables=spec["work_pool"].get("job_variables") or None,
                      parameters=spec.get("parameters") or {}, description=spec.get("description"),
                      tags=spec.get("tags") or None, schedules=schedules or None, build=False, push=False,
                      print_next_steps=False, ignore_warnings=True)
        done.append(f"{loaded.name}/{spec['name']}")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".")
    parser.add_argument("--prefect-file", default="infra/prefect.yaml")
    parser.add_argument("names", nargs="*", help="only these deployment names (default: all)")
    args = parser.parse_args(argv)
    for name in deploy_all(Path(args.root), args.prefect_file, args.names or None):
        print(f"deployed {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
