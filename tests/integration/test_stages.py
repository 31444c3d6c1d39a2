"""Each stage's contract on the smoke pipeline (run once by the session fixture), and one stage run alone."""
import json

import numpy as np
import pandas as pd
import pytest

from tests.conftest import alignflow


def test_curate_writes_validated_splits(smoke_project):
    curated = smoke_project / "data/smoke/curated"
    for split in ("sft", "rl", "logged", "eval", "ood", "real", "corpus"):
        df = pd.read_parquet(curated / f"{split}.parquet")
        assert len(df) > 0 and {"id", "prompt", "response", "answer", "source", "line"} <= set(df.columns)
    assert pd.read_parquet(curated / "real.parquet")["answer"].isna().all()  # hidden
    assert len(pd.read_parquet(curated / "real_answers.parquet")) == 20
    summary = json.loads((curated / "validation.json").read_text())
    assert summary["evaluated_expectations"] >= 5


def test_base_and_sft_are_loadable_transformers_models(smoke_project):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    for stage in ("base", "sft"):
        path = smoke_project / "models/smoke" / stage
        assert (path / "model.safetensors").exists() and not list(path.glob("*.bin"))
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert model.config.model_type == "qwen2" and tok.chat_template
    base = AutoModelForCausalLM.from_pretrained(smoke_project / "models/smoke/base")
    sft = AutoModelForCausalLM.from_pretrained(smoke_project / "models/smoke/sft")
    assert any(not np.allclose(a.detach(), b.detach()) for a, b in zip(base.parameters(), sft.parameters()))
    curve = pd.read_csv(smoke_project / "metrics/smoke/sft_curve.csv")
    assert curve["loss"].iloc[-1] < curve["loss"].iloc[0]


def test_rl_writes_every_candidate(smoke_project):
    rl = json.loads((smoke_project / "metrics/smoke/rl.json").read_text())
    assert sorted(rl["candidates"]) == ["grpo-s0-2", "grpo-s0-4", "grpo-s1-2", "grpo-s1-4"]
    for name in rl["candidates"]:
        assert (smoke_project / "models/smoke/rl" / name / "model.safetensors").exists()
    curve = pd.read_csv(smoke_project / "metrics/smoke/rl_curve.csv")
    assert set(curve["run"]) == {"grpo-s0", "grpo-s1"}
    assert (curve["sync_max_abs_diff"] <= 1e-4).all()
    assert not (smoke_project / "checkpoints/smoke/rl").exists()  # resume state cleared once the stage finished


def test_logged_keeps_behaviour_logprobs(smoke_project):
    logs = pd.read_parquet(smoke_project / "data/smoke/logged/logged.parquet")
    assert len(logs) == 40
    for ids, lps in zip(logs["completion_ids"], logs["behaviour_logprobs"]):
        assert len(ids) == len(lps) > 0 and all(lp <= 0 for lp in lps)
    # the pipeline's reward, recomputed by hand: accuracy of `A:<a+b>` + 0.1 x the length penalty past 8 chars
    for prompt, completion, reward in zip(logs["prompt"], logs["completion"], logs["reward"]):
        a, b = (int(x) for x in prompt.removesuffix("=?").split("+"))
        correct = float(completion.strip().endswith(f"A:{a + b}"))
        over = max(0, len(completion) - 8)
        assert reward == pytest.approx(correct - 0.1 * min(1.0, over / 8)), (prompt, completion)


def test_ope_estimates_every_candidate_with_intervals(smoke_project):
    ope = json.loads((smoke_project / "data/smoke/ope/selection.json").read_text())
    names = {"sft", "grpo-s0-2", "grpo-s0-4", "grpo-s1-2", "grpo-s1-4"}
    for est in ("tis", "pdis", "sntis", "snpdis", "dm", "dr", "sndr"):
        assert set(ope["estimators"][est]["estimates"]) == names, est
    assert set(ope["vsdr"]["scores"]) == names
    assert (smoke_project / "data/smoke/ope/inputs.npz").exists()


def test_evaluate_writes_report_with_plots(smoke_project):
    html = (smoke_project / "reports/smoke/report.html").read_text()
    assert html.count("data:image/png;base64") >= 4
    for section in ("Example completions", "sft completion", "Learning curves",
                    "Estimate (with interval) vs true value", "SharpeRatio@k", "VSDR"):
        assert section in html


def test_a_stage_runs_alone_from_the_cli(smoke_project):
    before = pd.read_parquet(smoke_project / "data/smoke/curated/sft.parquet")
    alignflow(smoke_project, "stage", "curate", "--pipeline", "smoke")
    after = pd.read_parquet(smoke_project / "data/smoke/curated/sft.parquet")
    pd.testing.assert_frame_equal(before, after)  # seeded: the same rows again


def test_validate_data_cli(smoke_project, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "1+2=?", "response": "1+2=3;A:3"}\n{"prompt": 5}\n')
    proc = alignflow(smoke_project, "validate-data", str(good), "--quarantine", str(tmp_path / "q.jsonl"), check=False)
    assert proc.returncode == 0
    rows = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rows] == [(2, "prompt has wrong type (int)")]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = alignflow(smoke_project, "validate-data", str(empty), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
