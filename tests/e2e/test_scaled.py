"""Scaled mode end to end on loopback: `alignflow infra up` (PostgreSQL-backed Prefect server, MLflow server,
local DVC remote, a process worker per pool), `post_training` triggered through the REST API for the smoke
pipeline, every stage a `dvc-stage` deployment run in its pool, results through the DVC remote and MLflow.

Skips, naming the reason, when PostgreSQL is not reachable (ALIGNFLOW_TEST_POSTGRES, default
postgresql://postgres@127.0.0.1:5432; each run creates and drops its own alignflow_test_<random> database).
Figures (start-up, per-stage dispatch overhead) are printed and written to bench/results/scaled.json."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from alignflow import infra
from alignflow.stage import STAGES
from tests.conftest import BIN, REPO, make_project, project_env, stage_runs

POSTGRES = os.environ.get("ALIGNFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
GPU_STAGES = [s for s in STAGES if STAGES[s].pool == "gpu"]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
FIGURES: dict = {}


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _trigger_and_wait(api, deployment: str, parameters: dict, timeout: float = 1800) -> tuple[dict, float]:
    dep = api.get(f"deployments/name/{deployment}").json()
    start = time.monotonic()
    run = api.post(f"deployments/{dep['id']}/create_flow_run", json={"parameters": parameters}).json()
    while time.monotonic() - start < timeout:
        run = api.get(f"flow_runs/{run['id']}").json()
        if run["state_type"] in TERMINAL:
            return run, time.monotonic() - start
        time.sleep(2)
    raise AssertionError(f"{deployment} still {run['state_type']} after {timeout:.0f} s")


def _children(api, parent_id: str) -> dict[str, dict]:
    """The dvc-stage flow runs the parent dispatched, by stage, with their `dispatch-<stage>` task run.
    (run_deployment links a child to a task run of its own inside the parent, not to the calling task.)"""
    tasks = api.post("task_runs/filter", json={"flow_runs": {"id": {"any_": [parent_id]}}, "limit": 200}).json()
    runs = api.post("flow_runs/filter", json={"flow_runs": {"parent_task_run_id": {"any_": [t["id"] for t in tasks]}},
                                              "limit": 200}).json()
    dispatch = {t["name"]: t for t in tasks}
    return {r["parameters"]["stage"]: {**r, "dispatch_task": dispatch.get(f"dispatch-{r['parameters']['stage']}")}
            for r in runs if r["parameters"].get("stage")}


# ---------------------------------------------------------------- fast checks (no servers)
def test_every_stage_has_a_deployment_in_its_pool():
    from flows.deploy import load_prefect_yaml
    from flows.stage_job import JOB_FLOW
    specs = {d["name"]: d for d in load_prefect_yaml(REPO / "infra" / "prefect.yaml")}
    assert {"sft", "rl", "logged", "evaluate"} <= set(GPU_STAGES)
    for stage in STAGES:
        spec = specs.get(stage)
        assert spec and spec["entrypoint"] == f"flows/stage_job.py:{JOB_FLOW.replace('-', '_')}", stage
        assert spec["work_pool"]["name"] == STAGES[stage].pool and spec["parameters"] == {"stage": stage}
    assert specs["nightly"]["schedules"][0]["cron"] and specs["scaled"]["work_pool"]["name"] == "cpu"


def test_binding_beyond_loopback_requires_auth(tmp_path, monkeypatch):
    for var in ("PREFECT_SERVER_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(infra.InfraError, match="PREFECT_SERVER_API_AUTH_STRING.*MLFLOW_TRACKING_USERNAME"):
        infra.up(infra.Settings(root=tmp_path, host="0.0.0.0"))
    assert not (tmp_path / ".alignflow" / "infra" / "state.json").exists()  # nothing was started


def test_mode_switch(monkeypatch):
    """Embedded stays the default; scaled is asked for (or found: a server holding the stage deployments)."""
    from flows.dispatch import ScaledModeError, scaled_mode
    for var in ("ALIGNFLOW_MODE", "PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    assert scaled_mode() is False
    monkeypatch.setenv("ALIGNFLOW_MODE", "embedded")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert scaled_mode() is False  # never asks the server
    monkeypatch.setenv("ALIGNFLOW_MODE", "distributed")
    with pytest.raises(ScaledModeError, match="embedded, scaled, auto"):
        scaled_mode()
    monkeypatch.setenv("ALIGNFLOW_MODE", "scaled")
    with pytest.raises(ScaledModeError, match="MLFLOW_TRACKING_URI"):
        scaled_mode()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert scaled_mode() is True


def test_carried_files_stay_inside_the_checkout_and_passwords_stay_out_of_state(tmp_path):
    from flows.stage_job import read_files, write_files
    write_files(tmp_path, {"metrics/p/a.json": "{}", "bin.dat": "base64://4=", "gone.json": None})
    assert read_files(tmp_path, ["metrics/p/a.json", "bin.dat", "gone.json"]) == {
        "metrics/p/a.json": "{}", "bin.dat": "base64://4=", "gone.json": None}
    for bad in ("../outside.json", "/etc/passwd", "metrics/../../x"):
        with pytest.raises(ValueError, match="outside"):
            write_files(tmp_path, {bad: "x"})
    assert infra.mask_url("postgresql://u:s3cret@db:5432/prefect") == "postgresql://u:***@db:5432/prefect"


def test_retrain_ingests_only_settled_inbox_files(tmp_path):
    from flows.retrain import RetrainSettings, ingest
    root = make_project(tmp_path / "proj")
    inbox = root / "data" / "inbox"
    (inbox / "rl").mkdir(parents=True)
    demo = (REPO / "data" / "raw" / "extra_demos.jsonl").read_text().splitlines()[0] + "\n"
    (inbox / "new_demos.jsonl").write_text(demo)
    (inbox / "rl" / "prompts.jsonl").write_text(demo)
    (inbox / "still_writing.jsonl").write_text(demo)
    (inbox / ".hidden.jsonl").write_text(demo)
    (inbox / "notes.txt").write_text("not data")
    old = time.time() - 3600
    for name in ("new_demos.jsonl", "rl/prompts.jsonl", ".hidden.jsonl", "notes.txt"):
        os.utime(inbox / name, (old, old))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout

    got = ingest.fn(root, "smoke", RetrainSettings(settle_seconds=60))
    assert sorted(got["ingested"]) == ["data/raw/new_demos.jsonl", "data/raw/prompts.jsonl"]
    raw = yaml.safe_load((root / "pipelines.yaml").read_text())
    sources = raw["pipelines"]["smoke"]["curate"]["sources"]
    assert {"path": "data/raw/new_demos.jsonl", "split": "sft"} in sources
    assert {"path": "data/raw/prompts.jsonl", "split": "rl"} in sources
    assert (root / "pipelines.yaml").read_text().startswith("# alignflow pipelines.")  # comments kept
    assert (inbox / "still_writing.jsonl").exists() and (inbox / ".hidden.jsonl").exists()
    assert not (inbox / "new_demos.jsonl").exists() and list((inbox / ".ingested").rglob("*.jsonl"))
    log = subprocess.run(["git", "log", "-1", "--name-only", "--format=%s"], cwd=root, capture_output=True,
                         text=True).stdout
    assert got["commit"] and got["commit"] != head.strip()
    assert log.startswith("retrain(smoke): ingest 2 file(s)") and "pipelines.yaml" in log
    # the same file arriving again is not a new source
    (inbox / "new_demos.jsonl").write_text(demo)
    os.utime(inbox / "new_demos.jsonl", (old, old))
    again = ingest.fn(root, "smoke", RetrainSettings(settle_seconds=60))
    assert again["ingested"] == [] and again["duplicates"] == ["new_demos.jsonl"]


# ---------------------------------------------------------------- the server set
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    problem = infra.postgres_problem(f"{POSTGRES}/postgres")
    if problem:
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES} (set ALIGNFLOW_TEST_POSTGRES): {problem}")
    root = make_project(tmp_path_factory.mktemp("scaled") / "proj")
    url = f"{POSTGRES}/alignflow_test_{secrets.token_hex(4)}"
    settings = infra.Settings(root=root, prefect_port=0, mlflow_port=0, database_url=url)
    try:
        with infra.running(settings) as state:
            FIGURES["startup_s"] = state["timings"]
            yield {**state, "root_path": root}
    finally:
        infra.drop_database(url)
        if FIGURES:
            out = REPO / "bench" / "results" / "scaled.json"
            out.write_text(json.dumps({"test": "tests/e2e/test_scaled.py", "machine_cpus": os.cpu_count(),
                                       "when": datetime.now().isoformat(timespec="seconds"), **FIGURES},
                                      indent=2) + "\n")


@pytest.fixture(scope="module")
def api(stack):
    with infra.api_client(stack["api_url"]) as client:
        yield client


@pytest.fixture(scope="module")
def pipeline_run(stack, api):
    run, wall = _trigger_and_wait(api, "post_training/scaled", {"pipeline": "smoke"})
    FIGURES["pipeline_wall_s"] = round(wall, 1)
    return run


@pytest.mark.scaled
def test_status_reports_everything_up(stack):
    st = infra.status(stack["root_path"])
    assert st["running"], infra.format_status(st)
    assert st["pools"]["gpu"]["concurrency_limit"] == 1 and st["pools"]["cpu"]["concurrency_limit"] is None
    assert list(st["pools"]["gpu"]["workers"].values()) == ["ONLINE"]
    assert stack["database"].startswith("postgresql://")
    remote = subprocess.run([str(BIN / "dvc"), "remote", "list"], cwd=stack["root_path"], capture_output=True,
                            text=True, env=project_env(stack["root_path"])).stdout
    assert "alignflow" in remote and stack["dvc_remote"] in remote.replace("\n", "").replace(" ", ""), remote


@pytest.mark.scaled
def test_deployments_pools_and_retrain_schedule(stack, api):
    for stage, spec in STAGES.items():
        dep = api.get(f"deployments/name/dvc-stage/{stage}").json()
        assert dep["work_pool_name"] == spec.pool, stage
    assert api.get("deployments/name/post_training/scaled").json()["work_pool_name"] == "cpu"
    nightly = api.get("deployments/name/retrain/nightly").json()
    assert [(s["schedule"]["cron"], s["active"]) for s in nightly["schedules"]] == [("0 3 * * *", True)]


@pytest.mark.scaled
def test_job_templates_are_accepted_by_the_server(stack, api):
    """infra/job-templates/{docker,kubernetes}.json are valid base job templates (every placeholder declared);
    the kubernetes one asks for nvidia.com/gpu, the docker one for an nvidia device."""
    for kind in ("docker", "kubernetes"):
        template = json.loads((REPO / "infra" / "job-templates" / f"{kind}.json").read_text())
        name = f"check-{kind}-{secrets.token_hex(2)}"
        r = api.post("work_pools/", json={"name": name, "type": kind, "base_job_template": template})
        assert r.status_code == 201, r.text
        api.delete(f"work_pools/{name}")
    k8s = json.loads((REPO / "infra" / "job-templates" / "kubernetes.json").read_text())
    container = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    docker = json.loads((REPO / "infra" / "job-templates" / "docker.json").read_text())
    assert docker["job_configuration"]["container_create_kwargs"]["device_requests"][0]["driver"] == "nvidia"


@pytest.mark.scaled
def test_post_training_through_the_api_runs_gpu_stages_in_the_gpu_pool(stack, api, pipeline_run):
    assert pipeline_run["state_type"] == "COMPLETED", pipeline_run["state"]
    assert pipeline_run["work_pool_name"] == "cpu"
    children = _children(api, pipeline_run["id"])
    assert sorted(children) == sorted(STAGES)
    for stage, run in children.items():
        assert run["state_type"] == "COMPLETED", (stage, run["state"])
        assert run["work_pool_name"] == ("gpu" if stage in GPU_STAGES else "cpu"), stage
    # each stage's own flow run (`alignflow stage <name>` inside `dvc repro`) reported to the same server
    inner = api.post("flow_runs/filter", json={"flows": {"name": {"any_": list(STAGES)}}, "limit": 200}).json()
    assert {f"{s}-smoke" for s in STAGES} <= {r["name"] for r in inner}
    # where a dispatched stage's time goes: the job's own table artifact says how long `dvc repro` took (the
    # part the embedded mode spends too); the rest of the dispatch task's wall time is the scaled mode's cost
    arts = api.post("artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [r["id"] for r in
                                                                                  children.values()]}}}).json()
    jobs = {}
    for art in (a for a in arts if (a.get("key") or "").startswith("dvc-stage-")):  # not the result records
        rows = json.loads(art["data"]) if isinstance(art["data"], str) else art["data"]
        jobs[rows[0]["stage"].split("@")[0]] = rows[0]
    wall = {s: _ts(children[s]["dispatch_task"]["end_time"]) - _ts(children[s]["dispatch_task"]["start_time"])
            for s in STAGES}
    FIGURES["dispatch_wall_s"] = {s: round(wall[s], 1) for s in STAGES}
    FIGURES["dvc_repro_s"] = {s: jobs[s]["repro_s"] for s in STAGES}
    FIGURES["dispatch_overhead_s"] = overhead = {s: round(wall[s] - jobs[s]["repro_s"], 1) for s in STAGES}
    FIGURES["checkout_pull_push_s"] = {s: round(jobs[s]["checkout_s"] + jobs[s]["pull_s"] + jobs[s]["push_s"], 1)
                                      for s in STAGES}
    print(f"\nscaled smoke pipeline {FIGURES.get('pipeline_wall_s')} s; dispatch overhead per stage {overhead}")
    # the parent's checkout got the small files back, and none of the large outputs
    root = stack["root_path"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert {f"{s}@smoke" for s in STAGES} <= set(lock)
    assert json.loads((root / "metrics/smoke/evaluate.json").read_text())["champion"]
    assert not (root / "models" / "smoke").exists() and not (root / "data" / "smoke").exists()


@pytest.mark.scaled
def test_mlflow_server_holds_the_runs_and_the_champion(stack, pipeline_run, tmp_path):
    import mlflow
    uri = stack["mlflow_url"]  # explicit everywhere: never this process's global tracking/registry URI
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    _, children = stage_runs(client, "smoke")
    assert sorted(r.info.run_name for r in children) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in children)
    sft = next(r for r in children if r.info.run_name == "sft")
    assert sft.data.tags["dvc.input.models/smoke/base"] not in ("", "not in dvc.lock")  # lineage travelled too
    ope = json.loads((stack["root_path"] / "metrics/smoke/ope.json").read_text())
    champion = client.get_model_version_by_alias("alignflow-smoke", "champion")
    assert champion.tags["candidate"] == ope["champion"] and str(ope["registered_version"]) == champion.version
    source = client.get_model_version_download_uri("alignflow-smoke", champion.version)
    local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp_path), tracking_uri=uri)
    assert (Path(local) / "MLmodel").exists()
    assert Path(stack["artifacts"]).is_dir() and any(Path(stack["artifacts"]).rglob("model.safetensors"))


@pytest.mark.scaled
def test_a_second_checkout_pulls_the_outputs(stack, pipeline_run, tmp_path):
    root, env = stack["root_path"], project_env(stack["root_path"])
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "add", "dvc.lock", "metrics"], cwd=root, check=True, env=env)
    subprocess.run([*git, "commit", "-qm", "scaled smoke run"], cwd=root, check=True, env=env)
    second = tmp_path / "second"
    subprocess.run(["git", "clone", "-q", str(root), str(second)], check=True, env=env)
    dvc = str(BIN / "dvc")
    subprocess.run([dvc, "remote", "add", "--local", "-d", "alignflow", stack["dvc_remote"]], cwd=second,
                   check=True, env=env)
    start = time.monotonic()
    pull = subprocess.run([dvc, "pull"], cwd=second, capture_output=True, text=True, env=env)
    FIGURES["second_checkout_pull_s"] = round(time.monotonic() - start, 1)
    assert pull.returncode == 0, pull.stdout + pull.stderr
    assert (second / "models/smoke/sft/model.safetensors").exists()
    assert (second / "data/smoke/ope").is_dir() and (second / "reports/smoke/report.html").exists()
    status = subprocess.run([dvc, "status"], cwd=second, capture_output=True, text=True, env=env)
    # only the always-run fingerprint of external inputs is listed (alignflow/fingerprint.py): nothing is stale
    assert status.stdout.split() == ["external@smoke:", "always", "changed"], status.stdout + status.stderr


@pytest.mark.scaled
def test_retrain_deployment_ingests_new_data_and_promotes_only_through_the_gate(stack, api, pipeline_run):
    import mlflow
    root = stack["root_path"]
    inbox = root / "data" / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    demos = (REPO / "data" / "raw" / "extra_demos.jsonl").read_text().splitlines()
    good = [line for line in demos if line.startswith("{") and line.endswith("}")][:3]
    (inbox / "arrived.jsonl").write_text("\n".join(good) + "\n")
    client = mlflow.MlflowClient(tracking_uri=stack["mlflow_url"], registry_uri=stack["mlflow_url"])
    before = client.get_model_version_by_alias("alignflow-smoke", "champion").version

    run, wall = _trigger_and_wait(api, "retrain/nightly", {"pipeline": "smoke", "settle_seconds": 0})
    FIGURES["retrain_wall_s"] = round(wall, 1)
    assert run["state_type"] == "COMPLETED", run["state"]
    sub = api.post("flow_runs/filter", json={"flows": {"name": {"any_": ["post_training"]}},
                                            "flow_runs": {"start_time": {"after_": run["start_time"]}}}).json()
    assert len(sub) == 1 and sub[0]["state_type"] == "COMPLETED"
    children = _children(api, sub[0]["id"])
    assert children["curate"]["state_type"] == "COMPLETED"
    assert "data/raw/arrived.jsonl" in (root / "pipelines.yaml").read_text()
    ope = json.loads((root / "metrics/smoke/ope.json").read_text())
    after = client.get_model_version_by_alias("alignflow-smoke", "champion")
    if ope["promoted"]:  # the gate let the new one through: new version, the old one kept as `previous`
        assert after.version != before and after.tags["candidate"] == ope["champion"]
        assert client.get_model_version_by_alias("alignflow-smoke", "previous").version == before
    else:  # the gate kept the registered champion
        assert after.version == before and ope["registered_version"] is None


@pytest.mark.scaled
def test_down_drains_and_stops_everything(stack):
    infra.down(stack["root_path"], drain_timeout=30)
    st = infra.status(stack["root_path"])
    assert not st["running"] and not any(p["alive"] for p in st["processes"].values())
    assert st["health"] == {"prefect": False, "mlflow": False}
