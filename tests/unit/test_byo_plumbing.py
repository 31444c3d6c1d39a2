"""Bring-your-own plumbing on small fixed inputs: task rows, metric summaries, the zero-reward warning, solutions
from a named column, the external fingerprint, the pre-flight. Expected values are written out by hand."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
import torch

from alignflow.config import CandidateConfig, RewardSpec, RLConfig, TinyModelConfig, parse_project
from alignflow.data.rows import TaskRows
from alignflow.evaluation import metric_summary


def test_task_rows_from_curated_frame():
    df = pd.DataFrame({"prompt": ["a", "b"], "response": ["A", None],
                       "messages": [json.dumps([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]),
                                    json.dumps([{"role": "user", "content": "b"}])],
                       "columns": [json.dumps({"answer": ["x", "y"], "n": 1}), json.dumps({"answer": 3})]})
    rows = TaskRows.from_frame(df)
    assert rows.messages[0][0] == {"role": "system", "content": "s"}
    assert rows.columns == {"answer": [["x", "y"], 3], "n": [1, None]}  # original types; missing -> None
    rep = rows.repeat(2)
    assert rep.prompts == ["a", "a", "b", "b"] and rep.columns["n"] == [1, 1, None, None]
    assert rows.take([1]).responses == [None]
    with pytest.raises(KeyError, match="no column 'solution'"):
        rows.column("solution")


def test_metric_summary_by_hand():
    # 2 prompts x k=3 samples; None = not applicable to that sample
    per_function = {"em": [1.0, 0.0, 0.0, 0.0, 0.0, 0.0], "credit": [0.5, None, 1.0, None, None, None]}
    out = metric_summary(per_function, 3, greedy=False)
    assert out["em"] == {"mean@3": pytest.approx(1 / 6), "pass@3": pytest.approx(0.5)}
    assert out["credit"] == {"mean@3": pytest.approx(0.75), "pass@3": pytest.approx(1.0)}  # prompt 2 scored nothing
    assert metric_summary({"em": [1.0, 0.0]}, 1, greedy=True) == {"em": {"greedy": 0.5}}


def _tiny():
    from alignflow.models import build_tiny_model, build_tokenizer
    tok = build_tokenizer()
    torch.manual_seed(0)
    return build_tiny_model(tok, TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                                 intermediate_size=32)), tok


def _never(prompts, completions, **_):
    return [0.0] * len(completions)


def test_all_zero_rewards_warn_and_say_why(tmp_path, caplog):
    from alignflow.train import rl
    model, tok = _tiny()
    cand = CandidateConfig(name="z", seeds=[0], steps=3, checkpoints=[3], lr=1e-4)
    cfg = RLConfig(prompts_per_step=2, group_size=2, max_new_tokens=4, checkpoint_every=10)
    with caplog.at_level(logging.WARNING, logger="alignflow.train.rl"):
        rl.train_candidate(model, tok, cand, 0, cfg, TaskRows.from_texts(["1+2=?", "3+4=?"], answer=["3", "7"]), None,
                           tmp_path, on_log=lambda *a: None, reward_fn=_never, zero_reward_patience=2)
    warnings = [r.getMessage() for r in caplog.records if "every reward was 0" in r.getMessage()]
    assert len(warnings) == 1 and "last 2 RL steps" in warnings[0]  # once, at the patience, not every step


def test_per_function_reward_means_in_the_curve(tmp_path):
    from alignflow.rewards import RewardSet
    from alignflow.train import rl
    model, tok = _tiny()
    (tmp_path / "r.py").write_text("def one(prompts, completions, **_):\n    return [1.0] * len(completions)\n"
                                   "def half(prompts, completions, **_):\n    return [0.5, None] * (len(completions) // 2)\n")
    reward = RewardSet([RewardSpec(function="r.py:one", weight=2.0), RewardSpec(function="r.py:half")], tmp_path)
    logged = []
    rl.train_candidate(model, tok, CandidateConfig(name="m", seeds=[0], steps=1, checkpoints=[1], lr=1e-4), 0,
                       RLConfig(prompts_per_step=2, group_size=2, max_new_tokens=3), TaskRows.from_texts(["a", "b"]),
                       None, tmp_path / "ck", on_log=lambda step, m: logged.append(m), reward_fn=reward)
    assert logged[0]["reward/one"] == 1.0 and logged[0]["reward/half"] == 0.5
    assert logged[0]["reward"] == pytest.approx((2.5 + 2.0) / 2)  # 2*1 + 0.5 on even samples, 2*1 on odd ones


def test_solutions_come_from_the_named_column(tmp_path):
    from alignflow.steps.train import candidate_inputs
    rows = TaskRows.from_texts(["Reverse: a b", "Reverse: c d"], solution=["b a", "d c"])
    cand = CandidateConfig(name="o", algorithm="opsd")
    got = candidate_inputs(None, "cpu", cand, rows, solution_column="solution")
    assert got["solutions"] == ["b a", "d c"]
    with pytest.raises(ValueError, match="rl.solution_column"):  # not arithmetic, no demonstration: say what to set
        candidate_inputs(None, "cpu", cand, rows)


def test_external_fingerprint_changes_only_with_the_checkpoint(tmp_path):
    from alignflow import fingerprint
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "rewards.py").write_text("def r(prompts, completions, **_):\n    return [0.0] * len(completions)\n")
    raw = {"tracked": ["p"], "pipelines": {"p": {"curate": {"generator": None, "sources": []},
                                                 "rewards": [{"function": "rewards.py:r"}], "base": {"path": "model"}}}}
    cfg = parse_project(raw).pipelines["p"]
    out = fingerprint.write(tmp_path, "p", cfg)
    first, stamp = out.read_text(), out.stat().st_mtime_ns
    assert json.loads(first)["reward_files"] == {"rewards.py": fingerprint.hashlib.sha256(
        (tmp_path / "rewards.py").read_bytes()).hexdigest()}
    fingerprint.write(tmp_path, "p", cfg)
    assert out.stat().st_mtime_ns == stamp  # unchanged: not rewritten, so DVC sees nothing new
    (model / "config.json").write_text('{"changed": true}')
    fingerprint.write(tmp_path, "p", cfg)
    assert out.read_text() != first


def test_preflight_names_the_reward_file_and_the_missing_source(tmp_path):
    from alignflow import preflight
    (tmp_path / "bad.py").write_text("raise RuntimeError('broken at import')\n")
    raw = {"tracked": ["p"], "pipelines": {"p": {
        "curate": {"generator": None, "sources": [{"path": "data/missing.jsonl", "split": "rl"}]},
        "rewards": [{"function": "bad.py:r"}]}}}
    problems, _ = preflight.check(Path(tmp_path), "p", parse_project(raw).pipelines["p"])
    assert any("data/missing.jsonl" in p and "no such file" in p for p in problems), problems
    assert any(p.startswith("pipelines.p.rewards") and "bad.py" in p and "broken at import" in p for p in problems)


def test_a_user_task_needs_named_rewards():
    from alignflow.config import ConfigError
    raw = {"tracked": ["p"], "pipelines": {"p": {"curate": {"generator": None}}}}
    with pytest.raises(ConfigError, match="rewards: required when curate.generator is null"):
        parse_project(raw)


def test_changed_share_counts_bf16_elements(tmp_path):
    from alignflow import models
    from alignflow.steps.policies import changed_share
    model, tok = _tiny()
    models.save(model, tok, tmp_path / "ref")
    total = sum(p.numel() for p in model.state_dict().values())
    with torch.no_grad():
        model.lm_head.weight[0, :3] += 1.0      # 3 elements changed visibly
        model.lm_head.weight[1, 0] += 1e-9      # below bf16 resolution: not a change
    models.save(model, tok, tmp_path / "new")
    assert changed_share(tmp_path / "ref", tmp_path / "new") == pytest.approx(3 / total)
    assert changed_share(tmp_path / "ref", tmp_path / "ref") == 0.0


def test_validate_data_maps_columns(tmp_path):
    from alignflow.data.curate import validate_data
    path = tmp_path / "rl.parquet"
    pd.DataFrame({"question": ["Reverse: a b", "Reverse: c d"], "target": ["b a", "d c"]}).to_parquet(path)
    assert validate_data([str(path)], tmp_path / "q.jsonl", split="rl") == 1  # no prompt column: nothing valid
    assert "map one with columns" in (tmp_path / "q.jsonl").read_text()
    assert validate_data([str(path)], tmp_path / "q.jsonl", split="rl",
                         columns={"prompt": "question", "answer": "target"}) == 0


def test_metric_names_are_legal_for_mlflow():
    from alignflow.tracking import metric_name
    assert metric_name("metrics.sft.eval.exact_match.pass@4") == "metrics.sft.eval.exact_match.pass_at_4"
    assert metric_name("reward/my fn:v2") == "reward/my fn:v2"   # what MLflow allows stays
    assert metric_name("acc(τ)") == "acc___"  # (, τ and ) each replaced
