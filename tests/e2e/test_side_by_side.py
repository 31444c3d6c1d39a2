"""Two pipelines in two working directories at once, and a second run in the same directory (issue 6 §8)."""
import json
import subprocess
import time

import pytest

from tests.conftest import BIN, alignflow, make_project, project_env

pytestmark = pytest.mark.pipelines  # a whole extra pipeline run: `./test.sh -m pipelines`, in .ci/run


def test_two_projects_run_side_by_side_and_a_second_run_in_one_is_refused(tmp_path):
    roots = [make_project(tmp_path / name) for name in ("a", "b")]
    logs = [(root / "run.log").open("w") for root in roots]
    procs = [subprocess.Popen([str(BIN / "alignflow"), "run", "--pipeline", "smoke"], cwd=root, env=project_env(root),
                              stdout=log, stderr=subprocess.STDOUT) for root, log in zip(roots, logs)]
    try:
        lock = roots[0] / ".alignflow" / "run.lock"
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text().startswith("pid")) and time.time() < deadline:
            time.sleep(0.5)
        second = alignflow(roots[0], "run", "--pipeline", "smoke", check=False)
        assert procs[0].poll() is None, "the first run ended before the second one was tried"
        assert second.returncode == 2 and "already running" in second.stdout + second.stderr
        codes = [proc.wait(timeout=1500) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert codes == [0, 0], [(root / "run.log").read_text()[-3000:] for root in roots]
    # same config and seed: each run's results are exactly what the other got, so neither disturbed the other
    a, b = (json.loads((root / "metrics/smoke/evaluate.json").read_text()) for root in roots)
    assert a["policies"] == b["policies"] and a["champion"] == b["champion"]
