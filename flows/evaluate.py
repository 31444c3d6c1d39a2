"""evaluate: the stand-in for an online test. True values of base, SFT and every candidate (the greedy mean of the
pipeline's reward and of each metric on eval and, where the data has them, ood and real; mean@k and pass@k; the
sampled value under the logging settings), then how good the `ope`
stage's choice was: SharpeRatio@k and the rest per estimator, VSDR against sim-only and OOD-only, the
champion's regret. Writes metrics/<p>/evaluate.json and reports/<p>/report.html.

    dvc repro evaluate@tiny     or     alignflow stage evaluate --pipeline tiny
"""
from __future__ import annotations

import json

import pandas as pd
from prefect import flow

from alignflow import ope as core, report, tracking
from alignflow.config import PipelineConfig
from alignflow.data.rows import TaskRows, read_rows
from tasks.common import open_stage, publish_summary, tracked, write_metrics
from tasks.policies import candidate_dirs, changed_share, true_values


def _splits(curated) -> dict[str, TaskRows]:
    """eval, and ood / real where the data has them (real's answers are kept apart from its prompts)."""
    splits = {"eval": read_rows(curated, "eval")}
    if (curated / "ood.parquet").exists():
        splits["ood"] = read_rows(curated, "ood")
    if (curated / "real.parquet").exists() and (curated / "real_answers.parquet").exists():
        real = pd.read_parquet(curated / "real.parquet").drop(columns=["answer", "columns"], errors="ignore")
        splits["real"] = TaskRows.from_frame(real.merge(pd.read_parquet(curated / "real_answers.parquet"), on="id"))
    return splits


def _policy_values(ctx, cfg: PipelineConfig, splits: dict[str, TaskRows]) -> tuple[dict, dict]:
    policies = {"base": ctx.layout.base, **candidate_dirs(ctx.layout)}
    values, returns = {}, {}
    for name, path in policies.items():
        values[name], returns[name] = true_values(
            path, splits, ctx.rewards, ctx.metrics, cfg.evaluate.value_samples, cfg.evaluate.max_new_tokens,
            cfg.evaluate.batch_size, cfg.seed)
        if name not in ("base", "sft"):  # how much of the SFT model RL changed (bf16 elements)
            values[name]["changed_share_vs_sft"] = changed_share(ctx.layout.sft, path)
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in values[name].items() if isinstance(v, float)))
    return values, returns


@flow(name="evaluate", flow_run_name="evaluate-{pipeline}", log_prints=True)
def evaluate(pipeline: str = "tiny") -> dict:
    ctx = open_stage("evaluate", pipeline, inputs=["curated", "base", "sft", "rl", "logged", "ope"])
    cfg = ctx.cfg
    with tracked(ctx, cfg.evaluate.model_dump()) as run:
        splits = _splits(ctx.layout.curated)
        values, returns = _policy_values(ctx, cfg, splits)
        ope_out = json.loads((ctx.layout.metrics / "ope.json").read_text())
        champion, behaviour_value = ope_out["champion"], ope_out["behaviour_value"]
        candidates = [n for n in values if n != "base"]
        logged, logprobs, states = core.load_inputs(ctx.layout.ope / "inputs.npz")
        selection = core.selection_metrics(logged, logprobs, {n: returns[n] for n in candidates},
                                           cfg.ope.estimators, cfg.ope.top_k, candidate_states=states)
        true_sampled = {n: values[n]["sampled_value"] for n in candidates}
        vsdr = ope_out["vsdr"]
        if "real" in splits and "sim_values" in vsdr:
            selection["vsdr"] = core.vsdr_report(
                vsdr["sim_values"], {n: s["entropy"] for n, s in vsdr["ood_scores"].items()},
                {n: values[n]["real_score"] for n in candidates})
        else:
            selection["vsdr"] = {"skipped": vsdr.get("skipped", "no real split")}
        metrics = {
            "policies": {n: {k: v for k, v in vals.items() if k != "metrics"} for n, vals in values.items()},
            "metrics": {n: vals["metrics"] for n, vals in values.items()},
            "champion": champion,
            "champion_regret": max(true_sampled.values()) - true_sampled[champion],
            "behavior_value": behaviour_value,
            **{f"n_{split}": len(rows) for split, rows in splits.items()},
            "skipped_splits": {s: "not in the data" for s in ("ood", "real") if s not in splits},
            "selection": selection,
        }
        write_metrics(ctx, metrics)
        rows = [{"policy": n, **{k: round(v, 4) for k, v in m.items()}} for n, m in metrics["policies"].items()]
        report_path = report.write_report(ctx.layout, metrics, ope_out)
        tracking.log_artifact(report_path, "report")
        publish_summary(ctx, run.info.run_id, f"champion **{champion}**: eval score "
                        f"{metrics['policies'][champion]['eval_score']:.3f}, regret {metrics['champion_regret']:.3f}", rows)
    return metrics
