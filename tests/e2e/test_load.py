"""Load: N flow runs of a light deployment (infra-check/cpu) created at once against a PostgreSQL-backed
Prefect server with one process worker; all must complete, none lost or duplicated. Figures are printed and
written to bench/results/load.json (wall time, latency percentiles, throughput, the machine).

    ALIGNFLOW_LOAD_RUNS=20 (default)   ALIGNFLOW_TEST_POSTGRES=postgresql://postgres@127.0.0.1:5432
"""
from __future__ import annotations

import json
import os
import platform
import secrets
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest

from alignflow import infra
from tests.conftest import REPO, make_project

pytestmark = pytest.mark.scaled

N_RUNS = int(os.environ.get("ALIGNFLOW_LOAD_RUNS", "20"))
POSTGRES = os.environ.get("ALIGNFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    problem = infra.postgres_problem(f"{POSTGRES}/postgres")
    if problem:
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES} (set ALIGNFLOW_TEST_POSTGRES): {problem}")
    root = make_project(tmp_path_factory.mktemp("load"))
    url = f"{POSTGRES}/alignflow_test_{secrets.token_hex(4)}"
    settings = infra.Settings(root=root, prefect_port=0, mlflow_port=0, database_url=url, deployments=["cpu"])
    try:
        with infra.running(settings) as state:
            yield state
    finally:
        infra.drop_database(url)


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def test_burst_of_flow_runs_all_complete(stack):
    api = infra.api_client(stack["api_url"])
    deployment = api.get("deployments/name/infra-check/cpu").json()
    batch = secrets.token_hex(3)

    def create(i: int) -> dict:
        with infra.api_client(stack["api_url"]) as client:  # one connection each: really at once
            r = client.post(f"deployments/{deployment['id']}/create_flow_run",
                            json={"parameters": {"message": f"load-{batch}-{i}"}})
            r.raise_for_status()
            return r.json()

    start = time.time()
    with ThreadPoolExecutor(N_RUNS) as pool:
        created = list(pool.map(create, range(N_RUNS)))
    created_s = time.time() - start
    ids = [r["id"] for r in created]
    assert len(set(ids)) == N_RUNS

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        runs = api.post("flow_runs/filter", json={"flow_runs": {"id": {"any_": ids}}, "limit": 200}).json()
        if len(runs) == N_RUNS and all(r["state_type"] in TERMINAL for r in runs):
            break
        time.sleep(1)
    wall_s = time.time() - start
    states = {}
    for r in runs:
        states[r["state_type"]] = states.get(r["state_type"], 0) + 1
    assert len(runs) == N_RUNS, f"lost runs: {N_RUNS - len(runs)}"
    assert states == {"COMPLETED": N_RUNS}, states
    assert sorted(r["parameters"]["message"] for r in runs) == sorted(f"load-{batch}-{i}" for i in range(N_RUNS))

    latency = sorted(_ts(r["end_time"]) - _ts(r["created"]) for r in runs)   # created -> finished
    queued = sorted(_ts(r["start_time"]) - _ts(r["created"]) for r in runs)  # created -> running
    run_time = sorted(r["total_run_time"] for r in runs)
    q = statistics.quantiles(latency, n=20)
    result = {
        "test": "tests/e2e/test_load.py", "n_runs": N_RUNS, "deployment": "infra-check/cpu",
        "database": "postgresql", "workers": 1, "worker_limit": None,
        "create_all_s": round(created_s, 2), "wall_s": round(wall_s, 2),
        "throughput_runs_per_s": round(N_RUNS / wall_s, 3),
        "latency_s": {"p50": round(statistics.median(latency), 2), "p95": round(q[18], 2),
                      "max": round(latency[-1], 2)},
        "queued_s": {"p50": round(statistics.median(queued), 2), "max": round(queued[-1], 2)},
        "run_time_s": {"p50": round(statistics.median(run_time), 2), "max": round(run_time[-1], 2)},
        "states": states, "lost": N_RUNS - len(runs),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "when": datetime.now().isoformat(timespec="seconds"),
    }
    out = REPO / "bench" / "results" / "load.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{N_RUNS} runs: all completed in {wall_s:.1f} s wall ({N_RUNS / wall_s:.2f} runs/s); latency p50 "
          f"{result['latency_s']['p50']} s, p95 {result['latency_s']['p95']} s, max {result['latency_s']['max']} s "
          f"-> {out}")
