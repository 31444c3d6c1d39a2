"""evaluate: the stand-in for an online test. True values of base, SFT and every candidate (the greedy mean of the
pipeline's reward and of each metric on eval and, where the data has them, ood and real; mean@k and pass@k; the
sampled value under the logging settings), then how good the `ope` stage's choice was: SharpeRatio@k and the rest
per estimator, VSDR against sim-only and OOD-only, the champion's regret.

metrics/<p>/evaluate.json holds the headline figures (`dvc metrics show`); reports/<p>/evaluate.json everything
(per-metric figures, selection quality per estimator), and reports/<p>/report.html the page."""
from __future__ import annotations

import json

import pandas as pd

from alignflow import ope as core, report, tracking
from alignflow.data.rows import TaskRows, read_rows
from alignflow.layout import write_json
from alignflow.stage import StageContext
from alignflow.steps.policies import candidate_dirs, changed_share, true_values

HEADLINE = ("eval_score", "ood_score", "real_score", "sampled_value")


def splits(curated) -> dict[str, TaskRows]:
    """eval, and ood / real where the data has them (real's answers are kept apart from its prompts)."""
    found = {"eval": read_rows(curated, "eval")}
    if (curated / "ood.parquet").exists():
        found["ood"] = read_rows(curated, "ood")
    if (curated / "real.parquet").exists() and (curated / "real_answers.parquet").exists():
        real = pd.read_parquet(curated / "real.parquet").drop(columns=["answer", "columns"], errors="ignore")
        found["real"] = TaskRows.from_frame(real.merge(pd.read_parquet(curated / "real_answers.parquet"), on="id"))
    return found


def policy_values(ctx: StageContext, rows: dict[str, TaskRows], policies: dict) -> tuple[dict, dict]:
    """True values of each policy directory, and its per-prompt returns (for the selection metrics)."""
    cfg = ctx.cfg
    values, returns = {}, {}
    for name, path in policies.items():
        values[name], returns[name] = ctx.task(true_values)(
            path, rows, ctx.rewards, ctx.metrics, cfg.evaluate.value_samples, cfg.evaluate.max_new_tokens,
            cfg.evaluate.batch_size, cfg.seed)
        if name not in ("base", "sft"):  # how much of the SFT model RL changed (bf16 elements)
            values[name]["changed_share_vs_sft"] = ctx.task(changed_share)(ctx.layout.sft, path)
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in values[name].items() if isinstance(v, float)))
    return values, returns


def run(ctx: StageContext) -> dict:
    cfg, layout = ctx.cfg, ctx.layout
    rows = splits(layout.curated)
    values, returns = policy_values(ctx, rows, {"base": layout.base, **candidate_dirs(layout)})
    ope_out = json.loads(layout.ope_details.read_text())
    champion = ope_out["champion"]
    candidates = [n for n in values if n != "base"]
    logged, logprobs, states = core.load_inputs(layout.ope_inputs)
    selection = core.selection_metrics(logged, logprobs, {n: returns[n] for n in candidates},
                                       cfg.ope.estimators, cfg.ope.top_k, candidate_states=states)
    true_sampled = {n: values[n]["sampled_value"] for n in candidates}
    vsdr = ope_out["vsdr"]
    if "real" in rows and "sim_values" in vsdr:
        selection["vsdr"] = core.vsdr_report(vsdr["sim_values"], {n: s["entropy"] for n, s in vsdr["ood_scores"].items()},
                                             {n: values[n]["real_score"] for n in candidates})
    else:
        selection["vsdr"] = {"skipped": vsdr.get("skipped", "no real split")}
    details = {
        "policies": {n: {k: v for k, v in vals.items() if k not in ("metrics", "examples")} for n, vals in values.items()},
        "metrics": {n: vals["metrics"] for n, vals in values.items()},
        "examples": {n: vals["examples"] for n, vals in values.items()},
        "champion": champion,
        "champion_regret": max(true_sampled.values()) - true_sampled[champion],
        "behavior_value": ope_out["behaviour_value"],
        **{f"n_{split}": len(split_rows) for split, split_rows in rows.items()},
        "skipped_splits": {s: "not in the data" for s in ("ood", "real") if s not in rows},
        "selection": selection,
    }
    write_json(layout.evaluate_details, details)
    tracking.log_artifact(layout.evaluate_details, "report")
    tracking.log_artifact(report.write_report(layout, details, ope_out), "report")
    tracking.log_table(report.example_rows(details), "report/examples.json")
    tracking.log_metrics({f"{n}.changed_share_vs_sft": p["changed_share_vs_sft"]   # how much RL changed the model
                          for n, p in details["policies"].items() if "changed_share_vs_sft" in p})
    ctx.summary = (f"champion **{champion}**: eval score {details['policies'][champion]['eval_score']:.3f}, "
                   f"regret {details['champion_regret']:.3f}",
                   [{"policy": n, **{k: round(v, 4) for k, v in m.items()}} for n, m in details["policies"].items()])
    return headline(details)


def headline(details: dict) -> dict:
    """What `dvc metrics show` / `diff` print: per policy the reward's greedy mean per split and the sampled value;
    the champion, its regret, and each estimator's regret@1."""
    return {"policies": {n: {k: p[k] for k in HEADLINE if k in p} for n, p in details["policies"].items()},
            "champion": details["champion"], "champion_regret": details["champion_regret"],
            "behavior_value": details["behavior_value"],
            "regret_at_1": {e: s["regret_at_1"] for e, s in details["selection"].items() if "regret_at_1" in s}}
