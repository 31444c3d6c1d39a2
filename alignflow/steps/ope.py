"""ope: estimate every candidate's value from the behaviour logs alone (SCOPE-RL estimators on the two-action
token encoding), score how foreign the unlabelled real split is to each (VSDR), choose the champion by the
configured rule, and register it in MLflow through the promotion gate. No true value enters the choice: those
are measured later, in `evaluate`."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from alignflow import ope as core, tracking
from alignflow.data.rows import read_rows
from alignflow.layout import write_json
from alignflow.stage import StageContext
from alignflow.steps.policies import candidate_dirs, ood_scores, score_logged

CURRENT = "current_champion"


def run(ctx: StageContext) -> dict:
    cfg, layout = ctx.cfg.ope, ctx.layout
    registered_name = cfg.registered_model or f"alignflow-{ctx.pipeline}"
    logs = pd.read_parquet(layout.logged_file)
    logged = core.LoggedTokens(behaviour_logprobs=[np.asarray(x, float) for x in logs["behaviour_logprobs"]],
                               rewards=logs["reward"].to_numpy(float))
    dirs = candidate_dirs(layout)
    with tempfile.TemporaryDirectory() as tmp:  # the registered champion, estimated on today's logs like the rest
        current = ctx.task(tracking.load_registered)(registered_name, "champion", Path(tmp) / CURRENT)
        scored = {name: ctx.task(score_logged)(d, logs, seed=ctx.cfg.seed)
                  for name, d in {**dirs, **({CURRENT: current} if current else {})}.items()}
    logprobs = {name: lp for name, (lp, _) in scored.items()}
    states = {name: st for name, (_, st) in scored.items()}
    results = core.estimate(logged, logprobs, cfg.estimators, n_bootstrap=cfg.n_bootstrap, alpha=cfg.ci_alpha,
                            seed=ctx.cfg.seed, candidate_states=states)
    core.save_inputs(layout.ope_inputs, logged, {n: logprobs[n] for n in dirs}, {n: states[n] for n in dirs})

    own = {est: {**r, "estimates": {n: v for n, v in r["estimates"].items() if n != CURRENT}}
           for est, r in results.items()}
    decision = core.decide(own, results[cfg.select.estimator]["estimates"].get(CURRENT), cfg.select,
                           logged_rewards=logged.rewards)
    vsdr = _vsdr(ctx, dirs, {n: own[cfg.select.estimator]["estimates"][n]["value"] for n in dirs})

    champion = decision["champion"]
    version = None
    if decision["promoted"]:
        chosen = own[cfg.select.estimator]["estimates"][champion]
        version = ctx.task(tracking.register_policy)(dirs[champion], registered_name, "champion", tags={
            "candidate": champion, "pipeline": ctx.pipeline, "estimator": cfg.select.estimator,
            "rule": cfg.select.rule, "estimate": chosen["value"], "ci_low": chosen["ci_low"],
            "ci_high": chosen["ci_high"]})
    print(f"champion {champion}: {decision['reason']}")
    headline = {"champion": champion, "promoted": decision["promoted"], "promotion_reason": decision["reason"],
                "rule": f"{cfg.select.estimator}:{cfg.select.rule}", "registered_model": registered_name,
                "registered_version": version, "behaviour_value": float(logged.rewards.mean()),
                "n_logged": int(len(logs)),
                "estimate": {n: own[cfg.select.estimator]["estimates"][n]["value"] for n in dirs}}
    # every estimator's estimates, intervals and ESS, and VSDR's inputs: data/<p>/ope/selection.json
    write_json(layout.ope_details, {**headline, "vsdr": vsdr,
                                    "estimators": {e: {"estimates": r["estimates"], "ess": r["ess"]}
                                                   for e, r in own.items()}})
    tracking.log_artifact(layout.ope_details, "ope")
    ctx.summary = (f"champion **{champion}** ({decision['reason']})",
                   [{"candidate": n, **{e: round(own[e]["estimates"][n]["value"], 4) for e in own}} for n in dirs])
    return headline


def _vsdr(ctx: StageContext, dirs: dict, sim: dict) -> dict:
    """VSDR's inputs: the simulated value (the selection estimator's estimate) and each candidate's OOD-ness on
    the unlabelled real split."""
    if not (ctx.layout.curated / "real.parquet").exists():
        print("VSDR skipped: no real split (unlabelled traffic) in the data; VSDR needs one")
        return {"skipped": "no real split (unlabelled traffic) in the data: VSDR needs one"}
    real = read_rows(ctx.layout.curated, "real").messages
    reference = read_rows(ctx.layout.curated, "eval").messages[:len(real)]
    ood = {n: ctx.task(ood_scores)(d, real, reference, ctx.cfg.logged.max_new_tokens) for n, d in dirs.items()}
    return {"scores": core.vsdr_scores(sim, {n: s["entropy"] for n, s in ood.items()}), "ood_scores": ood,
            "sim_values": sim}
