"""rl: on-policy RL from the SFT model, one run per (candidate config x seed) on the shared loop in
alignflow/train/rl.py; every configured checkpoint of every run is a candidate policy in models/<p>/rl/.

    dvc repro rl@tiny     or     alignflow stage rl --pipeline tiny
"""
from prefect import flow

from tasks.common import open_stage, publish_summary, tracked, write_metrics
from tasks.train import clear_checkpoints, train_rl_candidate


@flow(name="rl", flow_run_name="rl-{pipeline}", log_prints=True)
def rl(pipeline: str = "tiny") -> dict:
    ctx = open_stage("rl", pipeline, inputs=["curated", "base", "sft", "teacher"])
    with tracked(ctx, ctx.cfg.rl.model_dump()) as run:
        candidates = []
        for i, cand in enumerate(ctx.cfg.rl.candidates):
            for seed in cand.seeds:
                candidates += train_rl_candidate(ctx, i, seed)
        final = {}
        for row in ctx.curve:  # last logged reward of each run
            final[row["run"]] = row["reward"]
        metrics = {"candidates": candidates, "final_reward": final}
        write_metrics(ctx, metrics, curve_name="rl_curve")
        publish_summary(ctx, run.info.run_id, f"{len(candidates)} candidates",
                        [{"run": k, "final_reward": v} for k, v in final.items()])
    clear_checkpoints(ctx)
    return metrics
