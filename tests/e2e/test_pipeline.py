"""The whole smoke pipeline through `alignflow run`: real Prefect flow runs, real `dvc repro`, a real MLflow
store and registry, a real Great Expectations validation. (Learning itself is checked at full size in
tests/e2e/test_learning.py, marked slow.)"""
import json
import sqlite3
import subprocess
import time

import pandas as pd
import pytest
import yaml

from tests.conftest import BIN, alignflow, project_env, stage_runs

from alignflow.config import load_pipeline
from alignflow.data.rows import read_rows
from alignflow.rewards import RewardSet
from alignflow.stage import STAGES


def load(root, rel):
    return json.loads((root / rel).read_text())


def test_evaluate_json_schema(smoke_project):
    ev = load(smoke_project, "reports/smoke/evaluate.json")
    candidates = ["grpo-s0-2", "grpo-s0-4", "grpo-s1-2", "grpo-s1-4"]
    assert set(ev["policies"]) == {"base", "sft", *candidates}
    for values in ev["policies"].values():
        assert {"eval_score", "ood_score", "real_score", "sampled_value"} <= set(values)
        # the smoke reward is accuracy + 0.1 x length_penalty (in [-1, 0]): scores lie in [-0.1, 1]
        assert all(-0.1 - 1e-9 <= v <= 1.0 for v in values.values()), values  # a mean of -0.1s may round below
    for per_split in ev["metrics"].values():  # the arithmetic task's metrics: accuracy and steps consistent
        assert set(per_split["eval"]) == {"accuracy", "steps_consistent"}
        assert {"greedy", "mean@1", "pass@1"} == set(per_split["eval"]["accuracy"])
    assert ev["champion"] in ["sft", *candidates]
    assert ev["n_eval"] == 40 and ev["n_ood"] == 40
    # the first prompts of each split, greedy, with their reward: the pipeline's reward of that prompt's row and
    # that completion (so prompt, completion and reward belong together)
    first = read_rows(smoke_project / "data/smoke/curated", "eval").take(list(range(5)))
    reward = RewardSet(load_pipeline("smoke", smoke_project / "pipelines.yaml").reward_specs, smoke_project)
    for policy, per_split in ev["examples"].items():
        assert set(per_split) == {"eval", "ood", "real"}, policy
        shown = per_split["eval"]
        assert [e["prompt"] for e in shown] == first.prompts
        recomputed = reward(first.prompts, [e["completion"] for e in shown], first.columns).total
        assert [e["reward"] for e in shown] == pytest.approx(recomputed), policy
    assert set(ev["examples"]) == set(ev["policies"])
    assert ev["champion_regret"] >= 0
    for name in ("tis", "pdis", "snpdis"):
        assert set(ev["selection"][name]["sharpe_ratio_at_k"]) == {"2", "3"}
        assert "regret_at_1" in ev["selection"][name]
    assert set(ev["selection"]["vsdr"]["spearman"]) == {"vsdr", "sim_only", "ood_only"}
    headline = load(smoke_project, "metrics/smoke/evaluate.json")  # what `dvc metrics show` prints: small
    assert headline["policies"] == {n: {k: v[k] for k in ("eval_score", "ood_score", "real_score", "sampled_value")}
                                    for n, v in ev["policies"].items()}
    assert headline["champion"] == ev["champion"] and headline["champion_regret"] == ev["champion_regret"]
    assert headline["regret_at_1"]["snpdis"] == ev["selection"]["snpdis"]["regret_at_1"]
    assert "selection" not in headline and "metrics" not in headline


def test_dvc_metrics_show_is_a_small_table(smoke_project):
    out = subprocess.run([str(BIN / "dvc"), "metrics", "show", "--json"], cwd=smoke_project,
                         env=project_env(smoke_project), capture_output=True, text=True, check=True)
    files = json.loads(out.stdout)[""]["data"]
    flat = lambda d: sum(flat(v) if isinstance(v, dict) else 1 for v in d.values())  # noqa: E731
    sizes = {path: flat(entry["data"]) for path, entry in files.items()}
    assert sizes["metrics/smoke/evaluate.json"] <= 60 and sizes["metrics/smoke/ope.json"] <= 20, sizes


def test_every_file_the_stages_wrote_is_declared_in_dvc_yaml(smoke_project):
    """An output written but not declared would be neither versioned nor a reason to re-run what reads it."""
    import yaml
    declared = []
    for name, stage in yaml.safe_load((smoke_project / "dvc.yaml").read_text())["stages"].items():
        for kind in ("outs", "metrics", "plots"):
            declared += [(list(o)[0] if isinstance(o, dict) else o).replace("${item}", "smoke")
                         for o in stage["do"].get(kind, [])]
    written = [p.relative_to(smoke_project).as_posix() for top in ("data/smoke", "models/smoke", "metrics/smoke", "reports/smoke")
               for p in (smoke_project / top).rglob("*") if p.is_file()]
    undeclared = [w for w in written if not any(w == d or w.startswith(d + "/") for d in declared)]
    assert written and not undeclared, undeclared


def test_champion_chosen_from_estimates_alone(smoke_project):
    from alignflow.ope import choose
    ope = load(smoke_project, "data/smoke/ope/selection.json")
    est, rule = ope["rule"].split(":")
    assert ope["champion"] == choose(ope["estimators"], est, rule)
    assert ope["champion"] == load(smoke_project, "metrics/smoke/evaluate.json")["champion"]
    for res in ope["estimators"].values():
        for e in res["estimates"].values():
            assert e["value"] is None or e["ci_low"] <= e["value"] <= e["ci_high"] + 1e-9


def test_malformed_row_quarantined_with_file_and_line(smoke_project):
    rows = [json.loads(line) for line in (smoke_project / "data/smoke/curated/quarantine.jsonl").read_text().splitlines()]
    bad = [r for r in rows if r["source"] == "data/raw/extra_demos.jsonl"]
    assert [(r["line"], r["reason"].split(":")[0]) for r in bad] == [(4, "invalid JSON")]
    sft = pd.read_parquet(smoke_project / "data/smoke/curated/sft.parquet")
    assert (sft["source"] == "data/raw/extra_demos.jsonl").sum() == 6  # every good row of that file went on
    assert load(smoke_project, "data/smoke/curated/validation.json")["success"] in (True, False)


def test_dvc_up_to_date_and_repro_runs_nothing(smoke_project):
    env = project_env(smoke_project)
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=smoke_project, env=env, capture_output=True, text=True)
    # only the always-run fingerprint of external inputs (alignflow/fingerprint.py) is listed; no stage is stale
    assert status.stdout.split() == ["external@smoke:", "always", "changed"], status.stdout
    repro = subprocess.run([str(BIN / "dvc"), "repro"], cwd=smoke_project, env=env, capture_output=True, text=True)
    ran = [line for line in (repro.stdout + repro.stderr).splitlines() if line.startswith("Running stage")]
    assert repro.returncode == 0 and ran == ["Running stage 'external@smoke':"], repro.stdout + repro.stderr


def mlflow_client(root):
    import mlflow
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.MlflowClient()


def test_mlflow_parent_with_nested_stage_runs_and_lineage(smoke_project):
    client = mlflow_client(smoke_project)
    _, children = stage_runs(client, "smoke")
    assert sorted(r.info.run_name for r in children) == sorted(STAGES)
    sft = next(r for r in children if r.info.run_name == "sft")
    assert len(sft.data.tags["git_commit"]) == 40
    assert sft.data.tags["dvc.input.models/smoke/base"] != "not in dvc.lock"
    assert "sft.lr" in sft.data.params
    curate = next(r for r in children if r.info.run_name == "curate")
    assert client.get_run(curate.info.run_id).inputs.dataset_inputs, "datasets logged with mlflow.log_input"
    evaluate = next(r for r in children if r.info.run_name == "evaluate")  # update sparsity and the examples table
    policies = load(smoke_project, "reports/smoke/evaluate.json")["policies"]
    assert {k: v for k, v in evaluate.data.metrics.items() if k.endswith(".changed_share_vs_sft")} == pytest.approx(
        {f"{n}.changed_share_vs_sft": p["changed_share_vs_sft"] for n, p in policies.items() if n not in ("base", "sft")})
    assert "report/examples.json" in [a.path for a in client.list_artifacts(evaluate.info.run_id, "report")]


def test_registered_champion_reproduces_its_accuracy(smoke_project):
    import mlflow
    from alignflow.evaluation import score
    client = mlflow_client(smoke_project)
    ope = load(smoke_project, "metrics/smoke/ope.json")
    version = client.get_model_version_by_alias("alignflow-smoke", "champion")
    assert version.tags["candidate"] == ope["champion"]
    comps = mlflow.transformers.load_model("models:/alignflow-smoke@champion", return_type="components")
    eval_df = pd.read_parquet(smoke_project / "data/smoke/curated/eval.parquet")
    from alignflow.data.rows import TaskRows
    from alignflow.rewards import RewardSet, accuracy_reward
    acc = score(comps["model"], comps["tokenizer"], TaskRows.from_frame(eval_df), RewardSet.of(accuracy_reward),
                max_new_tokens=16)["value"]
    assert acc == load(smoke_project, "reports/smoke/evaluate.json")["metrics"][ope["champion"]]["eval"]["accuracy"]["greedy"]


def test_prefect_recorded_the_flow_runs(smoke_project):
    db = sqlite3.connect(smoke_project / ".prefect" / "prefect.db")
    names = {row[0] for row in db.execute("select name from flow_run where state_type = 'COMPLETED'")}
    assert "post-training-smoke" in names
    assert {f"{s}-smoke" for s in STAGES} <= names


def test_bad_override_fails_before_work_naming_the_key(smoke_project):
    before = (smoke_project / "pipelines.yaml").read_text()
    proc = alignflow(smoke_project, "run", "--pipeline", "smoke", "-S", "rl.group_size=1", check=False)
    assert proc.returncode == 2
    assert "pipelines.smoke.rl.group_size: got 1" in proc.stderr
    proc = alignflow(smoke_project, "run", "--pipeline", "smoke", "-S", "sft.learning_rate=0.1", check=False)
    assert proc.returncode == 2 and "sft.learning_rate" in proc.stderr
    assert (smoke_project / "pipelines.yaml").read_text() == before


def test_override_goes_through_dvc_and_plain_repro_reruns_only_what_changed(smoke_project):
    """An override is written by DVC's own code; DVC then sees exactly that stage as changed, and a plain
    `dvc repro` from the shell re-runs it alone, logging its own MLflow run with the same tags."""
    from alignflow.layout import find_root  # noqa: F401  (import check)
    from flows.post_training import apply_overrides
    apply_overrides(smoke_project, "smoke", ["evaluate.value_samples=2"])
    raw = yaml.safe_load((smoke_project / "pipelines.yaml").read_text())
    assert raw["pipelines"]["smoke"]["evaluate"]["value_samples"] == 2
    env = project_env(smoke_project)
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=smoke_project, env=env, capture_output=True, text=True)
    assert "evaluate@smoke" in status.stdout and "sft@smoke" not in status.stdout
    repro = subprocess.run([str(BIN / "dvc"), "repro"], cwd=smoke_project, env=env, capture_output=True, text=True)
    ran = [line for line in (repro.stdout + repro.stderr).splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'external@smoke':", "Running stage 'evaluate@smoke':"], \
        repro.stdout[-3000:] + repro.stderr[-3000:]
    client = mlflow_client(smoke_project)
    runs = client.search_runs([client.get_experiment_by_name("alignflow-smoke").experiment_id],
                              filter_string="tags.`alignflow.launcher` = 'dvc repro'")
    assert [r.info.run_name for r in runs] == ["evaluate"]
    assert "mlflow.parentRunId" not in runs[0].data.tags


def test_promotion_gate_keeps_the_champion_when_the_new_one_is_not_better(smoke_project):
    """A retrained pipeline whose best estimate does not beat the registered champion's by the margin keeps it."""
    from flows.post_training import apply_overrides
    client = mlflow_client(smoke_project)
    before = client.get_model_version_by_alias("alignflow-smoke", "champion").version
    apply_overrides(smoke_project, "smoke", ["ope.select.margin=1.0"])  # no estimate can beat another by 1.0
    try:
        alignflow(smoke_project, "stage", "ope", "--pipeline", "smoke")
        ope = load(smoke_project, "metrics/smoke/ope.json")
        assert ope["promoted"] is False and "margin" in ope["promotion_reason"]
        assert client.get_model_version_by_alias("alignflow-smoke", "champion").version == before
    finally:
        apply_overrides(smoke_project, "smoke", ["ope.select.margin=0.0"])
        alignflow(smoke_project, "stage", "ope", "--pipeline", "smoke")
