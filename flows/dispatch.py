"""Scaled mode, the parent side: whether `post_training` sends stages to workers, and sending one there
(`dvc-stage/<stage>` on the stage's pool, StageSpec.pool), then writing back what it returns."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from alignflow.stage import STAGES
from flows.stage_job import JOB_FLOW, PARENT_ENV, _git, carried_paths, read_files, write_files
from tasks.retry import stage_task


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
