"""ope: estimate every candidate's value from the behaviour logs alone (SCOPE-RL estimators on the
two-action token encoding), score how foreign the unlabelled real split is to each (VSDR), choose the
champion by the configured rule, and register it in MLflow through the promotion gate.
No true value enters the choice: those are measured later, in `evaluate`.

    dvc repro ope@tiny     or     alignflow stage ope --pipeline tiny
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import flow

from alignflow import models, ope as core, tracking
from alignflow.data.rows import read_rows
from tasks.common import open_stage, publish_summary, stage_task, tracked, write_metrics
from tasks.policies import candidate_dirs, ood_scores, score_logged

CURRENT = "current_champion"


@stage_task
def current_champion_dir(registered_name: str, into: Path) -> Path | None:
    """The registered champion as a model directory, so it can be estimated on today's logs like the rest."""
    if tracking.current_alias(registered_name, "champion") is None:
        return None
    import mlflow
    comps = mlflow.transformers.load_model(f"models:/{registered_name}@champion", return_type="components")
    models.save(comps["model"], comps["tokenizer"], into)
    return into


@flow(name="ope", flow_run_name="ope-{pipeline}", log_prints=True)
def ope(pipeline: str = "tiny") -> dict:
    ctx = open_stage("ope", pipeline, inputs=["curated", "logged", "sft", "rl"])
    cfg = ctx.cfg.ope
    registered_name = cfg.registered_model or f"alignflow-{pipeline}"
    with tracked(ctx, cfg.model_dump()) as run, tempfile.TemporaryDirectory() as tmp:
        logs = pd.read_parquet(ctx.layout.logged / "logged.parquet")
        logged = core.LoggedTokens(behaviour_logprobs=[np.asarray(x, float) for x in logs["behaviour_logprobs"]],
                                   rewards=logs["reward"].to_numpy(float))
        dirs = candidate_dirs(ctx.layout)
        current = current_champion_dir(registered_name, Path(tmp) / CURRENT)
        scored = {name: score_logged(d, logs, seed=ctx.cfg.seed)
                  for name, d in {**dirs, **({CURRENT: current} if current else {})}.items()}
        logprobs = {name: lp for name, (lp, _) in scored.items()}
        states = {name: st for name, (_, st) in scored.items()}
        results = core.estimate(logged, logprobs, cfg.estimators, n_bootstrap=cfg.n_bootstrap, alpha=cfg.ci_alpha,
                                seed=ctx.cfg.seed, candidate_states=states)
        core.save_inputs(ctx.layout.ope / "inputs.npz", logged, {n: logprobs[n] for n in dirs},
                         {n: states[n] for n in dirs})

        # ---- choose from estimates alone, then the promotion gate against the registered champion
        own = {est: {**r, "estimates": {n: v for n, v in r["estimates"].items() if n != CURRENT}}
               for est, r in results.items()}
        champion = core.choose(own, cfg.select.estimator, cfg.select.rule)
        chosen = own[cfg.select.estimator]["estimates"][champion]
        current_est = results[cfg.select.estimator]["estimates"].get(CURRENT)
        key = "value" if cfg.select.rule == "estimate" else "ci_low"
        promoted, why = core.promotion_gate(chosen[key], current_est[key] if current_est else None, cfg.select.margin,
                                            candidates=[e[key] for e in own[cfg.select.estimator]["estimates"].values()],
                                            logged_rewards=logged.rewards)

        # ---- VSDR: simulated value (the selection estimator's estimate) against OOD-ness of the real split
        sim = {n: own[cfg.select.estimator]["estimates"][n]["value"] for n in dirs}
        if (ctx.layout.curated / "real.parquet").exists():
            real = read_rows(ctx.layout.curated, "real").messages
            reference = read_rows(ctx.layout.curated, "eval").messages[:len(real)]
            ood = {n: ood_scores(d, real, reference, ctx.cfg.logged.max_new_tokens) for n, d in dirs.items()}
            vsdr = core.vsdr_scores(sim, {n: s["entropy"] for n, s in ood.items()})
        else:
            ood, vsdr = {}, None
            print("VSDR skipped: no real split (unlabelled traffic) in the data; VSDR needs one")

        if promoted:
            version = tracking.register_policy(dirs[champion], registered_name, "champion", tags={
                "candidate": champion, "pipeline": pipeline, "estimator": cfg.select.estimator,
                "rule": cfg.select.rule, "estimate": chosen["value"], "ci_low": chosen["ci_low"],
                "ci_high": chosen["ci_high"]})
        else:
            version = None
        print(f"champion {champion}: {why}")
        metrics = {"estimators": {e: {"estimates": r["estimates"], "ess": r["ess"]} for e, r in own.items()},
                   "vsdr": ({"scores": vsdr, "ood_scores": ood, "sim_values": sim} if vsdr is not None else
                            {"skipped": "no real split (unlabelled traffic) in the data: VSDR needs one"}),
                   "rule": f"{cfg.select.estimator}:{cfg.select.rule}", "champion": champion,
                   "promoted": promoted, "promotion_reason": why, "registered_model": registered_name,
                   "registered_version": version,
                   "behaviour_value": float(logged.rewards.mean()), "n_logged": int(len(logs))}
        write_metrics(ctx, metrics)
        publish_summary(ctx, run.info.run_id, f"champion **{champion}** ({why})",
                        [{"candidate": n, **{e: round(own[e]["estimates"][n]["value"], 4) for e in own}}
                         for n in dirs])
    return metrics
