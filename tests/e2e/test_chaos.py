"""The chaos benchmark's CI version: a SIGKILL, a Ctrl-C and a Prefect-style cancellation (SIGTERM to the process
group) at a random moment of a random stage (seed 2 draws curate/KILL, sft/TERM, rl/INT), then a resumed run that must finish with the uninterrupted run's
results, no corrupt artifact and no process of the group left behind. `python bench/chaos.py --runs 20`
is the full version (bench/results/chaos.json)."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.pipelines  # a whole extra pipeline run: `./test.sh -m pipelines`, in .ci/run


def test_interrupted_runs_stop_whole_and_resume_to_the_same_results(tmp_path):
    out = tmp_path / "chaos.json"
    cmd = [sys.executable, str(REPO / "bench/chaos.py"), "--runs", "3", "--seed", "2", "--signals", "KILL", "INT", "TERM",
           "--max-delay", "3", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    result = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert result["kills"] == result["runs"] == 3
    assert result["resumed_ok"] == result["identical_results"] == 3
    assert result["corrupt_artifacts"] == 0 and result["groups_left_running"] == 0
    assert {t["signal"] for t in result["trials"]} == {"KILL", "INT", "TERM"}
