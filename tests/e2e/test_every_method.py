"""Every registered method runs as a candidate of a pipeline's rl stage (the teacher stage first, for opd/exopd)."""
import json
import shutil

import yaml

from alignflow.algorithms import ALGORITHMS
import pytest

from tests.conftest import alignflow

pytestmark = pytest.mark.pipelines  # a whole extra pipeline run: `./test.sh -m pipelines`, in .ci/run


def test_every_method_is_a_candidate_of_the_rl_stage(smoke_project, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(smoke_project, root, symlinks=True, ignore=shutil.ignore_patterns(".prefect", "mlruns*"))
    raw = yaml.safe_load((root / "pipelines.yaml").read_text())
    raw["pipelines"]["smoke"]["rl"]["candidates"] = [
        {"name": name, "algorithm": name, "seeds": [0], "steps": 2, "checkpoints": [2]} for name, _ in ALGORITHMS.items()]
    (root / "pipelines.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for stage in ("teacher", "rl"):
        alignflow(root, "stage", stage, "--pipeline", "smoke")
    assert json.loads((root / "metrics/smoke/teacher.json").read_text())["built"] is True
    candidates = json.loads((root / "metrics/smoke/rl.json").read_text())["candidates"]
    assert candidates == [f"{name}-s0-2" for name, _ in ALGORITHMS.items()]
    for name in candidates:
        assert (root / "models/smoke/rl" / name / "model.safetensors").exists()
