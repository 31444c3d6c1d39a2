"""Prefect flows: the stages (flows/stages.py, one thin flow per entry of alignflow/stage.py's table) and
`post_training`, which chains them through DVC; `retrain`; the scaled mode's stage job (stage_job.py), its dispatch (dispatch.py) and deployments (deploy.py)."""


def no_heartbeat():
    """Flow runs without Prefect's heartbeat (about a second of overhead per flow run otherwise)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


# Blocks until its stdin closes (the kernel closes the parent's end of the pipe when the parent dies, however it dies),
# then stops the server: SIGTERM, SIGKILL after 5 s.
_WATCHDOG = """
import os, signal, sys, time
sys.stdin.buffer.read()
server = int(sys.argv[1])
def alive():
    try:
        os.kill(server, 0)
        return True
    except ProcessLookupError:
        return False
for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
    try:
        os.kill(server, sig)
    except ProcessLookupError:
        break
    deadline = time.monotonic() + grace
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
"""


_keep_alive: list = []   # this process's watchdogs: their stdin is our end of the pipe


def ensure_prefect_api() -> str:
    """PREFECT_API_URL as set, else Prefect's temporary server started now and exported to this process and its
    children (the stages DVC runs). Prefect stops that server at exit, which a SIGKILL skips: the orphaned server
    then lives on and holds the stage's stdout/stderr open. So a watchdog process is tied to this one by a pipe and
    stops the server once this process is gone, however it ended."""
    import os
    import subprocess
    import sys
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.server.api.server import SubprocessASGIServer
    server = SubprocessASGIServer()  # the instance Prefect's own client would start (one per process)
    server.start()
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(server.server_process.pid)],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # not in the terminal's group: a Ctrl-C reaches us first
    _keep_alive.append(watchdog)  # its stdin (our write end) stays open as long as this process lives
    os.environ["PREFECT_API_URL"] = server.api_url
    return server.api_url

