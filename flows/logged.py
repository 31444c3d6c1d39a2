"""logged: the behaviour policy's logs that off-policy evaluation needs. The default samples the SFT policy
on the logged prompts; real users point `curate.sources` at their own logs instead.

    dvc repro logged@tiny     or     alignflow stage logged --pipeline tiny
"""
from prefect import flow

from alignflow.data.rows import read_rows
from tasks.common import open_stage, publish_summary, tracked, write_metrics
from tasks.policies import log_behaviour


@flow(name="logged", flow_run_name="logged-{pipeline}", log_prints=True)
def logged(pipeline: str = "tiny") -> dict:
    ctx = open_stage("logged", pipeline, inputs=["curated", "sft"])
    cfg = ctx.cfg.logged
    with tracked(ctx, cfg.model_dump()) as run:
        rows = read_rows(ctx.layout.curated, "logged")
        logs, reward_errors = log_behaviour(ctx.layout.sft, rows, ctx.rewards, cfg.n_responses, cfg.max_new_tokens,
                                            cfg.temperature, ctx.cfg.seed)
        ctx.layout.logged.mkdir(parents=True, exist_ok=True)
        tmp = ctx.layout.logged / ".logged.parquet.tmp"
        logs.to_parquet(tmp)
        tmp.replace(ctx.layout.logged / "logged.parquet")
        metrics = {"n_responses": len(logs), "behaviour_value": float(logs["reward"].mean()),
                   "mean_tokens": float(logs["completion_ids"].map(len).mean()),
                   "reward_std": float(logs["reward"].std(ddof=0)), "reward_errors": reward_errors}
        if metrics["reward_std"] == 0:
            print(f"warning: every logged response has reward {metrics['behaviour_value']:.3f}: off-policy estimates "
                  "will not tell the candidates apart (check the rewards, or that the SFT policy can solve any prompt)")
        write_metrics(ctx, metrics)
        publish_summary(ctx, run.info.run_id, f"behaviour value {metrics['behaviour_value']:.3f}", [metrics])
    return metrics
