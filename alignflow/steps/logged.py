"""logged: the behaviour policy's logs that off-policy evaluation needs. The default samples the SFT policy
on the logged prompts; real users point `curate.sources` at their own logs instead."""
from __future__ import annotations

from alignflow.data.rows import read_rows
from alignflow.layout import atomic_path
from alignflow.stage import StageContext
from alignflow.steps.policies import log_behaviour


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg.logged
    rows = read_rows(ctx.layout.curated, "logged")
    logs, reward_errors = ctx.task(log_behaviour)(ctx.layout.sft, rows, ctx.rewards, cfg.n_responses,
                                                  cfg.max_new_tokens, cfg.temperature, ctx.cfg.seed)
    with atomic_path(ctx.layout.logged_file) as tmp:
        logs.to_parquet(tmp)
    metrics = {"n_responses": len(logs), "behaviour_value": float(logs["reward"].mean()),
               "mean_tokens": float(logs["completion_ids"].map(len).mean()),
               "reward_std": float(logs["reward"].std(ddof=0)), "reward_errors": reward_errors}
    if metrics["reward_std"] == 0:
        print(f"warning: every logged response has reward {metrics['behaviour_value']:.3f}: off-policy estimates "
              "will not tell the candidates apart (check the rewards, or that the SFT policy can solve any prompt)")
    ctx.summary = (f"behaviour value {metrics['behaviour_value']:.3f}", [metrics])
    return metrics
