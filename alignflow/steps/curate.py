"""curate: raw files / saved HF datasets / the task generator -> normalised, deduplicated, GX-validated
Parquet splits; every rejected row goes to quarantine.jsonl with its file, line and reason."""
from __future__ import annotations

from alignflow import tracking
from alignflow.data import curate as core
from alignflow.stage import StageContext


def run(ctx: StageContext) -> dict:
    # an empty required split raises, naming its files (the stage then fails)
    result = ctx.task(core.curate)(ctx.cfg.curate, ctx.layout.curated, ctx.root)
    counts = result["counts"]
    for bad in result["unreadable"]:
        print(f"unreadable, set aside: {bad['path']}: {bad['problem']}")
    for split, why in {**result.get("missing_splits", {}), **result.get("derived_splits", {})}.items():
        print(f"split {split}: {why}")
    for split in ("sft", "rl", "eval"):
        if (ctx.layout.curated / f"{split}.parquet").exists():
            tracking.log_dataset(ctx.layout.curated / f"{split}.parquet", f"{ctx.pipeline}-{split}", split)
    tracking.log_artifact(ctx.layout.curated / "quarantine.jsonl", "curate")
    tracking.log_artifact(ctx.layout.curated / "validation.json", "curate")
    ctx.summary = (f"{counts.get('quarantined', 0)} rows quarantined",
                   [{"split": k, "rows": v} for k, v in counts.items() if isinstance(v, int)])
    return {**counts, "unreadable_files": len(result["unreadable"]),
            "missing_splits": result.get("missing_splits", {}), "derived_splits": result.get("derived_splits", {})}
