"""The scaled mode's server set on one machine, without containers: `alignflow infra up|down|status`.

    up      PostgreSQL-backed Prefect server (SQLite when no database URL is given), after
            `prefect server database upgrade`; an MLflow tracking server (SQLite store + artifact folder,
            artifacts proxied through the server); a local-folder DVC remote configured in the project
            (`.dvc/config.local`); process work pools `cpu` and `gpu` (gpu concurrency = number of GPUs);
            one worker per pool; the deployments of infra/prefect.yaml (flows/deploy.py).
    down    drains the pools (pauses them, waits for running flow runs, cancels what is left), stops the
            workers, then the servers. Data (databases, artifacts, DVC remote) stays for the next `up`.
    status  which processes are alive, server health, pools and their workers.

Everything lives under `<root>/.alignflow/infra/`: state.json (pids, ports, URLs, start-up timings), env.sh
(what a client exports to use the set), logs/, prefect-home/, mlflow.db, mlflow-artifacts/, dvc-remote/,
results/ (Prefect results the parent flow reads back), work/<pool>/ (the workers' project checkouts).

Bound to 127.0.0.1 by default. Binding anything else needs authentication, read from the environment and
never written to state.json, env.sh or logs: PREFECT_SERVER_API_AUTH_STRING (`user:password`, Prefect's
basic auth; clients get it as PREFECT_API_AUTH_STRING) and MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD
(MLflow's basic-auth app; needs `pip install "mlflow[auth]==<mlflow version>"`). See docs/scaling.md.

Importable without Prefect or MLflow: it only starts their command-line programs and talks HTTP to them.
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from alignflow import versioning
from alignflow.layout import write_json
from alignflow.stage import STAGES

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
POOLS = tuple(sorted({spec.pool for spec in STAGES.values()}))  # the work pools the stages run in
BIN = Path(sys.executable).parent


class InfraError(RuntimeError):
    """Something the user has to fix before the set can start; the message says what."""


# ---------------------------------------------------------------- settings and paths
@dataclass
class Settings:
    root: Path
    host: str = "127.0.0.1"
    prefect_port: int | None = None      # None: 4200 if free, else any free port; 0: any free port
    mlflow_port: int | None = None       # None: 5000 if free, else any free port; 0: any free port
    database_url: str | None = None      # postgresql://user@host:port/db (created if missing); None: SQLite
    gpus: int = 1                        # concurrency limit of the `gpu` pool
    cpu_limit: int | None = None         # flow runs the cpu worker runs at once (None: no limit)
    workers: bool = True
    deploy: bool = True
    deployments: list[str] | None = None  # names from infra/prefect.yaml to deploy (None: all)
    startup_timeout: float = 180.0
    extra_env: dict[str, str] = field(default_factory=dict)  # added to every process (tests, tuning)

    @property
    def dir(self) -> Path:
        return infra_dir(self.root)


def infra_dir(root: Path) -> Path:
    return Path(root).resolve() / ".alignflow" / "infra"


def _client_host(host: str) -> str:
    """Where local clients reach a server bound to `host` (a wildcard bind is reached over loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _pick_port(host: str, wanted: int | None, default: int) -> int:
    if wanted == 0:
        return free_port(host)
    port = wanted or default
    if _port_free(host, port):
        return port
    if wanted:  # asked for explicitly: say so rather than silently moving
        raise InfraError(f"port {port} on {host} is in use; pick another or pass 0 for any free port")
    return free_port(host)


def mask_url(url: str) -> str:
    """A database URL with its password replaced, fit for logs and state.json."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


# ---------------------------------------------------------------- database
def _asyncpg_url(url: str) -> str:
    scheme, rest = url.split("://", 1)
    if not scheme.startswith("postgres"):
        raise InfraError(f"database URL {mask_url(url)!r}: only postgresql:// URLs are supported (or none: SQLite)")
    return f"postgresql+asyncpg://{rest}"


def ensure_database(url: str) -> None:
    """Create the URL's database if the server does not have it yet (connects to the `postgres` database)."""
    import asyncio

    import asyncpg

    plain = "postgresql://" + url.split("://", 1)[1]
    parts = urlsplit(plain)
    name = parts.path.lstrip("/")
    if not name or not name.replace("_", "").isalnum():
        raise InfraError(f"database URL {mask_url(url)!r}: name the database with letters, digits and _")
    admin = urlunsplit(parts._replace(path="/postgres"))

    async def run() -> None:
        try:
            conn = await asyncpg.connect(admin, timeout=10)
        except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as err:
            raise InfraError(f"PostgreSQL at {mask_url(admin)} is not reachable: {err}") from None
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(run())


def drop_database(url: str) -> None:
    """For tests: drop the URL's database (the Prefect server must be stopped)."""
    import asyncio

    import asyncpg
    parts = urlsplit("postgresql://" + url.split("://", 1)[1])
    name = parts.path.lstrip("/")

    async def run() -> None:
        conn = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")), timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(run())


# ---------------------------------------------------------------- auth
def _auth_env(settings: Settings) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(server env, client env, extra mlflow args). Loopback: nothing. Elsewhere: both servers behind auth."""
    if settings.host in LOOPBACK:
        return {}, {}, []
    missing = [v for v in ("PREFECT_SERVER_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
               if not os.environ.get(v)]
    if missing:
        raise InfraError(
            f"binding {settings.host} (not loopback) needs authentication; set {', '.join(missing)} in the "
            "environment (PREFECT_SERVER_API_AUTH_STRING=user:password for Prefect; MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD become MLflow's admin account). See docs/scaling.md, 'Auth'.")
    try:
        import flask_wtf  # noqa: F401  (MLflow's basic-auth app needs it)
    except ImportError:
        raise InfraError("MLflow basic auth needs the auth extra: pip install \"mlflow[auth]\" "
                         "(same version as mlflow)") from None
    auth_string = os.environ["PREFECT_SERVER_API_AUTH_STRING"]
    user, password = os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
    ini = settings.dir / "mlflow-auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                   f"database_uri = sqlite:///{settings.dir / 'mlflow-auth.db'}\n"
                   f"admin_username = {user}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    server = {"PREFECT_SERVER_API_AUTH_STRING": auth_string, "MLFLOW_AUTH_CONFIG_PATH": str(ini),
              "MLFLOW_AUTH_ADMIN_PASSWORD": password,
              "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
              or secrets.token_hex(32)}
    client = {"PREFECT_API_AUTH_STRING": auth_string, "MLFLOW_TRACKING_USERNAME": user,
              "MLFLOW_TRACKING_PASSWORD": password}
    return server, client, ["--app-name", "basic-auth"]


def _auth_header(env: dict[str, str]) -> dict[str, str]:
    auth = env.get("PREFECT_API_AUTH_STRING")
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}


# ---------------------------------------------------------------- processes
def _start(name: str, argv: list[str], env: dict[str, str], logs: Path) -> dict:
    log = (logs / f"{name}.log").open("ab")
    log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
    log.flush()
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)  # own process group: stopped as one, never by name
    log.close()
    return {"pid": proc.pid, "argv": argv, "log": str(logs / f"{name}.log")}


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _alive(proc: dict) -> bool:
    """The recorded process is running and is still the program we started (pids get reused)."""
    pid = proc["pid"]
    if sys.platform != "linux":  # no /proc: fall back to a signal-0 probe
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):  # exited, not yet reaped
        return False
    cmd = _cmdline(pid)
    if not cmd:  # between fork and exec: the cmdline is not there yet
        return True
    return all(token in cmd for token in proc["argv"][1:3])


def _stop(proc: dict, timeout: float = 15.0) -> str:
    if not _alive(proc):
        return "not running"
    pid = proc["pid"]
    try:
        os.killpg(pid, signal.SIGTERM)  # its own group (start_new_session): takes its children along
    except ProcessLookupError:
        return "not running"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(proc):
            return "stopped"
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return "killed after timeout"


def _wait_http(url: str, timeout: float, proc: dict, headers: dict | None = None) -> float:
    import httpx
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not _alive(proc):
            raise InfraError(f"{url}: the server process exited; see {proc['log']}")
        try:
            if httpx.get(url, timeout=2, headers=headers or {}).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise InfraError(f"{url} did not answer within {timeout:.0f} s; see {proc['log']}")


# ---------------------------------------------------------------- Prefect API (plain HTTP)
def _api(api_url: str, env: dict[str, str]):
    import httpx
    return httpx.Client(base_url=api_url.rstrip("/") + "/", headers=_auth_header(env), timeout=30)


def api_client(api_url: str):
    """An httpx client for the Prefect REST API (`api_client(state["api_url"]).get("health")`); basic auth
    from PREFECT_API_AUTH_STRING when set."""
    return _api(api_url, dict(os.environ))


def job_template(root: Path, kind: str = "process") -> dict:
    path = Path(root) / "infra" / "job-templates" / f"{kind}.json"
    if path.exists():
        return json.loads(path.read_text())
    from prefect.workers.process import ProcessWorker  # a project without infra/: Prefect's own default
    return ProcessWorker.get_default_base_job_template()


def ensure_pools(api_url: str, env: dict[str, str], root: Path, gpus: int) -> None:
    """Create or update the `cpu` and `gpu` process pools (unpaused; gpu limited to one flow run per GPU)."""
    template = job_template(root, "process")
    with _api(api_url, env) as api:
        for name, limit in (("cpu", None), ("gpu", gpus)):
            body = {"name": name, "type": "process", "base_job_template": template, "concurrency_limit": limit,
                    "description": f"alignflow {name} stages (`alignflow infra up`)"}
            r = api.post("work_pools/", json=body)
            if r.status_code == 409:
                r = api.patch(f"work_pools/{name}", json={"base_job_template": template, "concurrency_limit": limit,
                                                          "is_paused": False})
            r.raise_for_status()


def pool_workers(api_url: str, env: dict[str, str], pool: str) -> list[dict]:
    with _api(api_url, env) as api:
        r = api.post(f"work_pools/{pool}/workers/filter", json={})
        return r.json() if r.status_code == 200 else []


def _wait_worker(api_url: str, env: dict[str, str], pool: str, name: str, proc: dict, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not _alive(proc):
            raise InfraError(f"worker {name} exited; see {proc['log']}")
        if any(w["name"] == name and w.get("status") == "ONLINE" for w in pool_workers(api_url, env, pool)):
            return time.monotonic() - start
        time.sleep(0.25)
    raise InfraError(f"worker {name} did not come online within {timeout:.0f} s; see {proc['log']}")


def _runs_in_pools(api, pools: list[str], states: list[str]) -> list[dict]:
    body = {"work_pools": {"name": {"any_": pools}}, "flow_runs": {"state": {"type": {"any_": states}}}}
    r = api.post("flow_runs/filter", json=body)
    return r.json() if r.status_code == 200 else []


def drain(api_url: str, env: dict[str, str], timeout: float) -> dict:
    """Pause the pools (no new runs start), wait for running ones, then cancel what is left."""
    with _api(api_url, env) as api:
        for pool in POOLS:
            api.patch(f"work_pools/{pool}", json={"is_paused": True})
        deadline = time.monotonic() + timeout
        active = ["RUNNING", "PENDING", "CANCELLING"]
        while time.monotonic() < deadline and _runs_in_pools(api, list(POOLS), active):
            time.sleep(1)
        left = _runs_in_pools(api, list(POOLS), ["RUNNING", "PENDING"])
        for run in left:  # the worker kills the run's process, then the run ends CANCELLED
            api.post(f"flow_runs/{run['id']}/set_state",
                     json={"state": {"type": "CANCELLING", "name": "Cancelling",
                                     "message": "alignflow infra down"}, "force": True})
        deadline = time.monotonic() + 20
        while left and time.monotonic() < deadline and _runs_in_pools(api, list(POOLS), active):
            time.sleep(0.5)
        return {"cancelled": [r["name"] for r in left]}


# ---------------------------------------------------------------- up / down / status
def _read_state(root: Path) -> dict | None:
    path = infra_dir(root) / "state.json"
    return json.loads(path.read_text()) if path.exists() else None


def _write_state(root: Path, state: dict) -> None:
    write_json(infra_dir(root) / "state.json", state)


def client_env(state: dict) -> dict[str, str]:
    """What a client (a shell, a test, `alignflow run`) sets to use a running set. No secrets in here."""
    return {"PREFECT_API_URL": state["api_url"], "MLFLOW_TRACKING_URI": state["mlflow_url"],
            "ALIGNFLOW_MODE": "scaled", "ALIGNFLOW_DVC_REMOTE": state["dvc_remote"],
            "PREFECT_LOCAL_STORAGE_PATH": state["results"]}


def _write_env_sh(d: Path, state: dict) -> None:
    lines = ["# source me: the scaled set started by `alignflow infra up` (no secrets are written here;",
             "# when bound beyond loopback also export PREFECT_API_AUTH_STRING and MLFLOW_TRACKING_USERNAME/PASSWORD)"]
    lines += [f"export {k}={json.dumps(v)}" for k, v in client_env(state).items()]
    (d / "env.sh").write_text("\n".join(lines) + "\n")


def _self_ignoring(folder: Path) -> None:
    """A `*` .gitignore inside: git (and so tests' project copies) never pick up the state folder."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / ".gitignore").exists():
        (folder / ".gitignore").write_text("*\n")


class _Launch:
    """One `up`: the processes' environments, what has started so far (stopped again if a later step
    fails), and how long each step took."""

    def __init__(self, settings: Settings):
        self.settings, self.root, self.d = settings, Path(settings.root).resolve(), settings.dir
        self.logs, self.processes, self.timings = self.d / "logs", {}, {}
        self.server_auth, self.client_auth, self.mlflow_auth = _auth_env(settings)
        self.host, chost = settings.host, _client_host(settings.host)
        self.prefect_port = _pick_port(self.host, settings.prefect_port, 4200)
        self.mlflow_port = _pick_port(self.host, settings.mlflow_port, 5000)
        self.api_url = f"http://{chost}:{self.prefect_port}/api"
        self.mlflow_url = f"http://{chost}:{self.mlflow_port}"
        self.remote = str(self.d / "dvc-remote")
        base = {k: v for k, v in os.environ.items()  # nothing of another set, or a secret, inherited by accident
                if not k.startswith(("PREFECT_", "MLFLOW_", "ALIGNFLOW_"))}
        base.update({"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                     "PREFECT_HOME": str(self.d / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                     "PREFECT_LOGGING_LEVEL": "INFO", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                     "GX_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                     **settings.extra_env})
        self.base = base
        self.client = {**base, **self.client_auth, "PREFECT_API_URL": self.api_url,
                       "MLFLOW_TRACKING_URI": self.mlflow_url}

    def _timed(self, key: str, start: float) -> None:
        self.timings[key] = round(time.monotonic() - start, 2)

    def prefect_server(self) -> None:
        """`prefect server database upgrade` first (RECIPES.md section 2), then the server."""
        t, url = time.monotonic(), self.settings.database_url
        if url:
            ensure_database(url)
        # the UI has the browser call PREFECT_UI_API_URL; unset, it calls port 4200 whatever --port says
        advertise = (_client_host(self.host) if self.host in LOOPBACK
                     else os.environ.get("ALIGNFLOW_ADVERTISE_HOST") or socket.getfqdn())
        env = {**self.base, **self.server_auth,
               "PREFECT_API_DATABASE_CONNECTION_URL": _asyncpg_url(url) if url
               else f"sqlite+aiosqlite:///{self.d / 'prefect.db'}",
               "PREFECT_SERVER_API_HOST": self.host, "PREFECT_SERVER_API_PORT": str(self.prefect_port),
               "PREFECT_UI_API_URL": f"http://{advertise}:{self.prefect_port}/api"}
        proc = subprocess.run([str(BIN / "prefect"), "server", "database", "upgrade", "-y"], env=env,
                              capture_output=True, text=True)
        (self.logs / "prefect-db-upgrade.log").write_text(proc.stdout[-20000:] + proc.stderr[-20000:])
        if proc.returncode != 0:
            raise InfraError(f"prefect server database upgrade failed; see {self.logs / 'prefect-db-upgrade.log'}")
        self._timed("prefect_db_upgrade_s", t)
        t = time.monotonic()
        p = self.processes["prefect-server"] = _start("prefect-server", [
            str(BIN / "prefect"), "server", "start", "--host", self.host, "--port", str(self.prefect_port)],
            env, self.logs)
        _wait_http(f"{self.api_url}/health", self.settings.startup_timeout, p, _auth_header(self.client_auth))
        self._timed("prefect_server_s", t)

    def mlflow_server(self) -> None:
        t = time.monotonic()
        argv = [str(BIN / "mlflow"), "server", "--host", self.host, "--port", str(self.mlflow_port),
                "--backend-store-uri", f"sqlite:///{self.d / 'mlflow.db'}",
                "--artifacts-destination", str(self.d / "mlflow-artifacts"), "--workers", "1", *self.mlflow_auth]
        p = self.processes["mlflow-server"] = _start("mlflow-server", argv, {**self.base, **self.server_auth},
                                                     self.logs)
        _wait_http(f"{self.mlflow_url}/health", self.settings.startup_timeout, p)
        self._timed("mlflow_server_s", t)

    def workers(self) -> None:
        """One process worker per pool, with what a stage job needs (flows/stage_job.py:dvc_stage)."""
        t, host_name, launched = time.monotonic(), socket.gethostname().split(".")[0], []
        for pool in POOLS:
            name = f"{pool}-{host_name}"
            env = {**self.client, "PREFECT_WORKER_QUERY_SECONDS": "1", "ALIGNFLOW_MODE": "scaled",
                   "ALIGNFLOW_DVC_REMOTE": self.remote, "ALIGNFLOW_WORK_DIR": str(self.d / "work" / pool),
                   "PREFECT_LOCAL_STORAGE_PATH": str(self.d / "results")}
            if pool == "cpu":
                env["CUDA_VISIBLE_DEVICES"] = ""  # CPU stages never take a GPU
            argv = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", name]
            if pool == "cpu" and self.settings.cpu_limit:
                argv += ["--limit", str(self.settings.cpu_limit)]
            self.processes[f"worker-{pool}"] = _start(f"worker-{pool}", argv, env, self.logs)
            launched.append((pool, name))
        for pool, name in launched:
            _wait_worker(self.api_url, self.client, pool, name, self.processes[f"worker-{pool}"],
                         self.settings.startup_timeout)
        self._timed("workers_s", t)

    def deploy(self) -> list[str]:
        t = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "flows.deploy", "--root", str(self.root),
                               *(self.settings.deployments or [])], cwd=self.root,
                              env={**self.client, "PREFECT_LOGGING_LEVEL": "WARNING"}, capture_output=True, text=True)
        (self.logs / "deploy.log").write_text(proc.stdout[-20000:] + proc.stderr[-20000:])
        if proc.returncode != 0:
            raise InfraError(f"deploying infra/prefect.yaml failed; see {self.logs / 'deploy.log'}:\n"
                             f"{proc.stderr[-1500:]}")
        self._timed("deploy_s", t)
        return [line.split("deployed ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("deployed ")]

    def state(self) -> dict:
        s, d = self.settings, self.d
        return {"running": False, "root": str(self.root), "host": self.host, "api_url": self.api_url,
                "ui_url": self.api_url.removesuffix("/api"), "mlflow_url": self.mlflow_url,
                "database": mask_url(s.database_url) if s.database_url else f"sqlite:{d / 'prefect.db'}",
                "mlflow_store": f"sqlite:{d / 'mlflow.db'}", "artifacts": str(d / "mlflow-artifacts"),
                "dvc_remote": self.remote, "results": str(d / "results"), "gpus": s.gpus,
                "processes": self.processes, "timings": self.timings}


def up(settings: Settings, log=print) -> dict:
    """Start the set (or say it is already up); returns what state.json records."""
    root, d = Path(settings.root).resolve(), settings.dir
    state = _read_state(root)
    if state and state.get("running") and all(_alive(p) for p in state["processes"].values()):
        log(f"already up: Prefect {state['ui_url']}, MLflow {state['mlflow_url']} (`alignflow infra down` stops it)")
        return state
    if state and any(_alive(p) for p in state.get("processes", {}).values()):
        log("a previous set is partly up: stopping what is left of it first")
        down(root, drain_timeout=10, log=log)
    _self_ignoring(root / ".alignflow")
    for sub in ("logs", "prefect-home", "mlflow-artifacts", "dvc-remote", "results", "work/cpu", "work/gpu"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    launch = _Launch(settings)
    state = launch.state()
    try:
        with ThreadPoolExecutor(3) as pool:  # the two servers start side by side
            started = [pool.submit(launch.prefect_server), pool.submit(launch.mlflow_server),
                       pool.submit(versioning.set_remote, root, launch.remote)]
        for fut in started:
            fut.result()  # re-raises the first failure, once both servers had their chance to start
        launch._timed("servers_s", t0)
        t = time.monotonic()
        ensure_pools(launch.api_url, launch.client, root, settings.gpus)
        launch._timed("pools_s", t)
        if settings.workers:
            launch.workers()
        if settings.deploy:
            state["deployments"] = launch.deploy()
    except BaseException:
        for proc in reversed(list(launch.processes.values())):
            _stop(proc)
        _write_state(root, {**state, "failed_at": time.time()})
        raise
    launch._timed("total_s", t0)
    state.update(running=True, started_at=time.time())
    _write_state(root, state)
    _write_env_sh(d, state)
    log(f"up in {launch.timings['total_s']:.1f} s: Prefect UI {state['ui_url']}, MLflow {state['mlflow_url']}, "
        f"DVC remote {launch.remote}; `source {d / 'env.sh'}` to use it")
    return state


def down(root: Path, drain_timeout: float = 60.0, log=print) -> dict:
    root = Path(root).resolve()
    state = _read_state(root)
    if not state:
        log("nothing to stop: no .alignflow/infra/state.json")
        return {}
    procs = state.get("processes", {})
    report: dict[str, str] = {}
    workers = {k: v for k, v in procs.items() if k.startswith("worker-")}
    client = {**os.environ, "PREFECT_API_URL": state["api_url"]}
    if "PREFECT_SERVER_API_AUTH_STRING" in os.environ:
        client.setdefault("PREFECT_API_AUTH_STRING", os.environ["PREFECT_SERVER_API_AUTH_STRING"])
    if workers and _alive(procs.get("prefect-server", {"pid": -1, "argv": []})):
        try:
            report.update(drain(state["api_url"], client, drain_timeout))
        except Exception as err:  # the server may be half gone; stop the processes anyway
            report["drain"] = f"skipped: {err}"
    for name in [*workers, "mlflow-server", "prefect-server"]:
        if name in procs:
            report[name] = _stop(procs[name])
    state.update(running=False, stopped_at=time.time())
    _write_state(root, state)
    log("down: " + ", ".join(f"{k} {v}" for k, v in report.items()))
    return report


@contextmanager
def running(settings: Settings, drain_timeout: float = 10.0, log=print):
    """`up` on entry, `down` on exit (scripts, tests)."""
    state = up(settings, log=log)
    try:
        yield state
    finally:
        down(settings.root, drain_timeout=drain_timeout, log=log)


def postgres_problem(url: str, timeout: float = 3.0) -> str | None:
    """None when a PostgreSQL server answers at `url` (any database), else why not, in one line."""
    import asyncio

    import asyncpg

    async def probe() -> None:
        conn = await asyncpg.connect("postgresql://" + url.split("://", 1)[1], timeout=timeout)
        await conn.close()
    try:
        asyncio.run(probe())
        return None
    except Exception as err:  # noqa: BLE001 - any failure means "not usable", reported verbatim
        return f"{type(err).__name__}: {err}".splitlines()[0]


def status(root: Path) -> dict:
    import httpx
    root = Path(root).resolve()
    state = _read_state(root)
    if not state:
        return {"running": False, "processes": {}, "note": "never started here (`alignflow infra up`)"}
    out = {"running": False, "api_url": state["api_url"], "ui_url": state["ui_url"],
           "mlflow_url": state["mlflow_url"], "dvc_remote": state["dvc_remote"], "database": state["database"],
           "processes": {n: {"pid": p["pid"], "alive": _alive(p), "log": p["log"]}
                         for n, p in state.get("processes", {}).items()}}
    client = {**os.environ}
    health = {}
    for name, url in (("prefect", f"{state['api_url']}/health"), ("mlflow", f"{state['mlflow_url']}/health")):
        try:
            health[name] = httpx.get(url, timeout=3, headers=_auth_header(client)).status_code == 200
        except httpx.HTTPError:
            health[name] = False
    out["health"] = health
    if health["prefect"]:
        out["pools"] = {}
        for pool in POOLS:
            with _api(state["api_url"], client) as api:
                r = api.get(f"work_pools/{pool}")
            info = r.json() if r.status_code == 200 else {}
            out["pools"][pool] = {"exists": bool(info), "paused": info.get("is_paused"),
                                  "concurrency_limit": info.get("concurrency_limit"),
                                  "workers": {w["name"]: w.get("status")
                                              for w in pool_workers(state["api_url"], client, pool)}}
    out["running"] = all(health.values()) and all(p["alive"] for p in out["processes"].values())
    return out


def format_status(st: dict) -> str:
    if not st.get("processes"):
        return st.get("note", "not running")
    lines = [f"{'up' if st['running'] else 'DEGRADED or down'}: Prefect {st['ui_url']} "
             f"(health {st['health']['prefect']}), MLflow {st['mlflow_url']} (health {st['health']['mlflow']})",
             f"database {st['database']}; DVC remote {st['dvc_remote']}"]
    for name, p in st["processes"].items():
        lines.append(f"  {name:15s} pid {p['pid']:>7}  {'alive' if p['alive'] else 'DEAD'}  log {p['log']}")
    for pool, info in st.get("pools", {}).items():
        lines.append(f"  pool {pool}: paused={info['paused']} limit={info['concurrency_limit']} "
                     f"workers={info['workers'] or 'none'}")
    return "\n".join(lines)
