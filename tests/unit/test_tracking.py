"""alignflow.tracking's tables: logged into an MLflow run directly, or recorded without MLflow (FileRun, a GPU box
with only torch) and replayed by `alignflow import-tracking`; either way MLflow loads back the same rows."""
import mlflow
import pytest

from alignflow import tracking

ROWS = [{"split": "eval", "prompt": "1+2=?", "sft completion": "1+2=3;A:3", "sft reward": 1.0},
        {"split": "ood", "prompt": "50+50=?", "sft completion": "", "sft reward": 0.0}]


@pytest.mark.parametrize("recorded", ["mlflow", "file"])
def test_a_table_reaches_mlflow(tmp_path, monkeypatch, recorded):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    with monkeypatch.context() as patched:
        if recorded == "file":
            patched.setattr(tracking, "mlflow", None)  # as where mlflow is not installed
        with tracking.stage_run(tmp_path, "p", "evaluate", {"seed": 0}, []):
            tracking.log_table(ROWS, "report/examples.json")
    if recorded == "file":
        assert tracking.import_file_runs(tmp_path) == 1
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["alignflow-p"], output_format="list")
    assert len(runs) == 1
    table = mlflow.load_table("report/examples.json", run_ids=[runs[0].info.run_id])
    assert table[list(ROWS[0])].to_dict("records") == ROWS
