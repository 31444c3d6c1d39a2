import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Embedded-mode settings before anything imports prefect/mlflow (same as the CLI's defaults).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_project(dest: Path, tracked: str = "smoke") -> Path:
    """A fresh git + DVC project holding this repo's tracked files, as a user's clone would."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file() and not rel.startswith(("tests/", "bench/", "docs/", "metrics/", "dvc.lock")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    text = (dest / "pipelines.yaml").read_text().replace("tracked: [tiny]", f"tracked: [{tracked}]")
    (dest / "pipelines.yaml").write_text(text)
    env = project_env(dest)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


def project_env(root: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["PREFECT_HOME"] = str(root / ".prefect")
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("ALIGNFLOW_ROOT", None)
    return env


def alignflow(root: Path, *args: str, check: bool = True, timeout: int = 1200) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "alignflow"), *args], cwd=root, env=project_env(root), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"alignflow {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


@pytest.fixture(scope="session")
def smoke_project(tmp_path_factory) -> Path:
    """The smoke pipeline run once, end to end, through `alignflow run` (shared by the stage tests)."""
    root = make_project(tmp_path_factory.mktemp("smoke"))
    alignflow(root, "run", "--pipeline", "smoke")
    return root


def stage_runs(client, pipeline: str):
    """The pipeline's parent MLflow run and its nested stage runs (asserting there is exactly one parent)."""
    runs = client.search_runs([client.get_experiment_by_name(f"alignflow-{pipeline}").experiment_id])
    parents = [r for r in runs if r.info.run_name == f"post_training-{pipeline}"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], children
