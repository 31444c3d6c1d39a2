"""The settings a run needs with nothing started by hand (embedded Prefect, a local MLflow store, offline
Hugging Face), set in the environment before prefect / mlflow are imported. Used by the CLI and by flows run as
scripts (`python -m flows.retrain`)."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def embedded_defaults(root: Path | None) -> None:
    base = root or Path.cwd()
    for key, value in {
        "PREFECT_HOME": str(base / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "PREFECT_LOGGING_LEVEL": "WARNING",
        "GX_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(base / ".cache" / "hf-datasets"), "TOKENIZERS_PARALLELISM": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "TRANSFORMERS_VERBOSITY": "error",
        "MLFLOW_LOGGING_LEVEL": "WARNING",
    }.items():
        os.environ.setdefault(key, value)
    # dvc.yaml's cmd calls `alignflow`: make sure it is this installation's, not whatever is on PATH
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
