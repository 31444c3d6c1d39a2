"""What every stage shares, without Prefect: validated config and seeds, the tracked run, metrics files and
curves. (tasks/common.py adds the Prefect UI artifacts; `python -m alignflow.steps` runs stages without Prefect.)"""
from __future__ import annotations

import hashlib
import json
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from alignflow import tracking
from alignflow.config import PipelineConfig, load_pipeline
from alignflow.layout import Layout, find_root, write_csv, write_json


@dataclass
class StageContext:
    name: str
    pipeline: str
    cfg: PipelineConfig
    layout: Layout
    inputs: list[Path] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.layout.root

    @cached_property
    def ckpt(self) -> Path:
        """Resume state, keyed by the stage's config and its inputs' dvc.lock hashes: a checkpoint left by a
        run with other settings or other inputs is never resumed."""
        stage_cfg = getattr(self.cfg, self.name, None)
        key = json.dumps([stage_cfg.model_dump() if stage_cfg is not None else None, self.cfg.seed,
                          tracking.input_hashes(self.root, [self.layout.rel(p) for p in self.inputs])],
                         sort_keys=True, default=str)
        return self.layout.checkpoints(self.name) / hashlib.sha256(key.encode()).hexdigest()[:12]

    @cached_property
    def rewards(self):
        """The pipeline's reward (rewards.RewardSet): RL's reward, the logged value, what OPE estimates, evaluate's."""
        from alignflow.rewards import RewardSet
        return RewardSet(self.cfg.reward_specs, self.root)

    @cached_property
    def metrics(self):
        """What evaluate reports per split (evaluate.metrics, default the reward's functions)."""
        from alignflow.rewards import RewardSet
        if self.cfg.metric_specs is self.cfg.reward_specs:  # the default: the reward's own functions, scored once
            return self.rewards
        return RewardSet(self.cfg.metric_specs, self.root, key="evaluate.metrics")

    def log_step(self, step: int, metrics: dict, **labels) -> None:
        """One point of a learning curve: MLflow metric history + a row of the DVC plot CSV."""
        prefix = "".join(f"{v}/" for v in labels.values())
        tracking.log_metrics({f"{prefix}{k}": v for k, v in metrics.items()}, step=step)
        self.curve.append({**labels, "step": step, **{k: round(float(v), 6) for k, v in metrics.items()}})


def read_split(curated: Path, split: str):
    """A curated split as a DataFrame: the Parquet file, or its JSON Lines export where pyarrow is missing
    (a GPU box carrying only what the training needs; `alignflow export-splits` writes the exports)."""
    import importlib.util

    import pandas as pd
    parquet = curated / f"{split}.parquet"
    if parquet.exists() and importlib.util.find_spec("pyarrow"):
        return pd.read_parquet(parquet)
    # JSON text columns (messages, columns) and answers stay strings, not parsed or cast to numbers
    text = {c: str for c in ("prompt", "messages", "response", "answer", "columns")}
    return pd.read_json(curated / f"{split}.jsonl", lines=True, dtype=text)


def open_stage(name: str, pipeline: str, inputs: list[str]) -> StageContext:
    """Load the validated config, seed everything; `inputs` names the Layout attributes the stage reads."""
    root = find_root()
    cfg = load_pipeline(pipeline, root / "pipelines.yaml")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    layout = Layout(root, pipeline)
    return StageContext(name=name, pipeline=pipeline, cfg=cfg, layout=layout,
                        inputs=[getattr(layout, attr) for attr in inputs])


@contextmanager
def tracked(ctx: StageContext, stage_config: dict):
    config = {"pipeline": ctx.pipeline, "seed": ctx.cfg.seed, ctx.name: stage_config}
    with tracking.stage_run(ctx.root, ctx.pipeline, ctx.name, config, [ctx.layout.rel(p) for p in ctx.inputs]) as run:
        print(f"[{ctx.name}@{ctx.pipeline}] resolved config: {stage_config}")
        yield run


def write_metrics(ctx: StageContext, metrics: dict, curve_name: str | None = None) -> Path:
    """metrics/<pipeline>/<stage>.json (+ the curve CSV for DVC plots), logged to MLflow as well."""
    path = ctx.layout.metrics / f"{ctx.name}.json"
    write_json(path, metrics)
    tracking.log_metrics(_flat_numbers(metrics))
    tracking.log_artifact(path, "metrics")
    if curve_name:  # written even when empty (a given checkpoint trains no base): dvc.yaml declares it
        curve = ctx.layout.metrics / f"{curve_name}.csv"
        write_csv(curve, ctx.curve, header=["step"])
        tracking.log_artifact(curve, "metrics")
    return path



def _flat_numbers(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
            out[f"{prefix}{k}"] = v
    return out
