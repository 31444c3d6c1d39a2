"""flows.ensure_prefect_api: the temporary Prefect server that a standalone `alignflow stage` (or `alignflow run`)
starts is stopped when that process dies, a SIGKILL included; without the watchdog the server outlives it."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import project_env

ROOT = Path(__file__).resolve().parents[2]
STARTS = {  # each prints the server's pid, then SIGKILLs itself: Prefect's atexit stop never runs
    "watched": "from flows import ensure_prefect_api; ensure_prefect_api()",
    "unwatched": "from prefect.server.api.server import SubprocessASGIServer; SubprocessASGIServer().start()",
}
KILL_SELF = ("from prefect.server.api.server import SubprocessASGIServer; "
             "print(SubprocessASGIServer().server_process.pid, flush=True); "
             "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a killed orphan may wait as a zombie for a reaper: it no longer serves


def _server_of_killed_process(tmp_path: Path, how: str) -> int:
    out = tmp_path / f"{how}.out"
    with out.open("w") as f:  # a file, not a pipe: an orphaned server would hold a pipe open
        proc = subprocess.run([sys.executable, "-c", f"{STARTS[how]}; {KILL_SELF}"], cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT, env=project_env(tmp_path), timeout=180)
    assert proc.returncode == -signal.SIGKILL, out.read_text()[-3000:]
    return int(out.read_text().split()[0])


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _alive(pid)


def test_the_server_of_a_sigkilled_process_is_stopped(tmp_path):
    pid = _server_of_killed_process(tmp_path, "watched")
    assert _gone_within(pid, 20), f"the temporary Prefect server (pid {pid}) outlived its SIGKILLed process"


def test_without_the_watchdog_the_server_outlives_a_sigkill(tmp_path):
    """What the watchdog is for (and proof that the test above can fail): Prefect's own stop runs at exit only."""
    pid = _server_of_killed_process(tmp_path, "unwatched")
    try:
        assert not _gone_within(pid, 5), "Prefect now stops its server after a SIGKILL: the watchdog may go"
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
