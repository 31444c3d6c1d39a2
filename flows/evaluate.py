"""evaluate: the stand-in for an online test. True values of base, SFT and every candidate (greedy accuracy
on eval/OOD/real, steps-consistent rate, sampled value under the logging settings), then how good the `ope`
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
from tasks.common import open_stage, publish_summary, tracked, write_metrics
from tasks.policies import candidate_dirs, true_values


def _policy_values(ctx, cfg: PipelineConfig) -> tuple[dict, dict]:
    curated = ctx.layout.curated
    splits = {"eval": pd.read_parquet(curated / "eval.parquet"), "ood": pd.read_parquet(curated / "ood.parquet")}
    real = pd.read_parquet(curated / "real.parquet").drop(columns=["answer"], errors="ignore")
    splits["real"] = real.merge(pd.read_parquet(curated / "real_answers.parquet"), on="id")
    policies = {"base": ctx.layout.base, **candidate_dirs(ctx.layout)}
    values, returns = {}, {}
    for name, path in policies.items():
        values[name], returns[name] = true_values(
            path, splits, splits["eval"], cfg.evaluate.value_samples, cfg.evaluate.max_new_tokens,
            cfg.evaluate.batch_size, cfg.seed)
        print(f"{name}: {values[name]}")
    return values, returns


@flow(name="evaluate", flow_run_name="evaluate-{pipeline}", log_prints=True)
def evaluate(pipeline: str = "tiny") -> dict:
    ctx = open_stage("evaluate", pipeline, inputs=["curated", "base", "sft", "rl", "logged", "ope"])
    cfg = ctx.cfg
    with tracked(ctx, cfg.evaluate.model_dump()) as run:
        values, returns = _policy_values(ctx, cfg)
        ope_out = json.loads((ctx.layout.metrics / "ope.json").read_text())
        champion, behaviour_value = ope_out["champion"], ope_out["behaviour_value"]
        candidates = [n for n in values if n != "base"]
        logged, logprobs, states = core.load_inputs(ctx.layout.ope / "inputs.npz")
        selection = core.selection_metrics(logged, logprobs, {n: returns[n] for n in candidates},
                                           cfg.ope.estimators, cfg.ope.top_k, candidate_states=states)
        true_sampled = {n: values[n]["sampled_value"] for n in candidates}
        vsdr = ope_out["vsdr"]
        selection["vsdr"] = core.vsdr_report(vsdr["sim_values"], {n: s["entropy"] for n, s in vsdr["ood_scores"].items()},
                                             {n: values[n]["real_accuracy"] for n in candidates})
        metrics = {
            "policies": {n: {"eval_accuracy": v["eval_accuracy"], "ood_accuracy": v["ood_accuracy"],
                             "steps_consistent": v["steps_consistent"], "sampled_value": v["sampled_value"],
                             "real_accuracy": v["real_accuracy"]} for n, v in values.items()},
            "champion": champion,
            "champion_regret": max(true_sampled.values()) - true_sampled[champion],
            "behavior_value": behaviour_value,
            "n_eval": len(pd.read_parquet(ctx.layout.curated / "eval.parquet")),
            "n_ood": len(pd.read_parquet(ctx.layout.curated / "ood.parquet")),
            "selection": selection,
        }
        write_metrics(ctx, metrics)
        rows = [{"policy": n, **{k: round(v, 4) for k, v in m.items()}} for n, m in metrics["policies"].items()]
        report_path = report.write_report(ctx.layout, metrics, ope_out)
        tracking.log_artifact(report_path, "report")
        publish_summary(ctx, run.info.run_id, f"champion **{champion}**: eval accuracy "
                        f"{metrics['policies'][champion]['eval_accuracy']:.3f}, regret {metrics['champion_regret']:.3f}", rows)
    return metrics
