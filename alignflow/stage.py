"""The stage table and what every stage shares, without Prefect: validated config and seeds, the tracked run,
metrics files and curves.

STAGES is the one list of stages: their code, inputs, outputs, params and curves. The Prefect flows
(flows/stages.py), every torchrun rank and the torch-only runner (`python -m alignflow.steps`) all run a stage
through `run_stage`, and dvc.yaml is generated from the table (`alignflow dvc-yaml`; tests/unit/test_layers.py
checks that each stage's deps cover its code's import closure)."""
from __future__ import annotations

import hashlib
import importlib
import json
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from alignflow import tracking, versioning
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
    # How the stage's steps run: plainly, or (flows/stages.py) as Prefect tasks with retries on transient errors
    task: Callable[[Callable], Callable] = lambda fn: fn
    # What the stage says about itself when done: a headline and a table (the Prefect UI shows them as artifacts)
    summary: tuple[str, list[dict]] = ("", [])

    @property
    def root(self) -> Path:
        return self.layout.root

    @cached_property
    def ckpt(self) -> Path:
        """Resume state, keyed by the stage's config and its inputs' dvc.lock hashes: a checkpoint left by a
        run with other settings or other inputs is never resumed."""
        stage_cfg = getattr(self.cfg, self.name, None)
        key = json.dumps([stage_cfg.model_dump() if stage_cfg is not None else None, self.cfg.seed,
                          versioning.lock_hashes(self.root, [self.layout.rel(p) for p in self.inputs])],
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


@dataclass(frozen=True)
class StageSpec:
    """One stage: the function that runs it ("module:function", imported when the stage runs, so each stage's
    code, and with it its DVC deps, is its own), the Layout attributes it reads and writes, the pipeline config
    keys it reads, its metrics file and plots."""
    name: str
    run: str
    inputs: tuple[str, ...]
    outs: tuple[str, ...]
    params: tuple[str, ...]
    plots: dict = field(default_factory=dict)  # metrics/<p>/<name>.csv -> {"x":, "y":, "template":}
    curve: str | None = None        # the plot whose rows are the stage's logged steps (ctx.curve)
    external: bool = False          # reads what metrics/<p>/external.json fingerprints (checkpoints, reward files)
    raw_data: bool = False          # reads data/raw
    pool: str = "cpu"               # the scaled mode's work pool for its job (infra/prefect.yaml deploys it there)
    multi_rank: bool = False        # runs data-parallel under torchrun
    checkpointed: bool = False      # leaves resume state in checkpoints/<p>/<stage> until it finishes

    def step(self) -> Callable[[StageContext], dict]:
        module, _, function = self.run.partition(":")
        return getattr(importlib.import_module(module), function)


_STEP = {"x": "step"}
STAGES: dict[str, StageSpec] = {spec.name: spec for spec in [
    StageSpec("curate", "alignflow.steps.curate:run", inputs=(), outs=("curated",), params=("seed", "curate"),
              raw_data=True),
    StageSpec("base", "alignflow.steps.train:run_base", inputs=("curated",), outs=("base",),
              params=("seed", "base"), curve="base_curve", plots={"base_curve": {**_STEP, "y": "loss"}},
              external=True, checkpointed=True),
    StageSpec("sft", "alignflow.steps.train:run_sft", inputs=("curated", "base"), outs=("sft",),
              params=("seed", "rewards", "sft"), curve="sft_curve", plots={"sft_curve": {**_STEP, "y": "val_score"}},
              external=True, pool="gpu", multi_rank=True, checkpointed=True),
    StageSpec("teacher", "alignflow.steps.train:run_teacher", inputs=("curated", "base"), outs=("teacher",),
              params=("seed", "teacher", "rl.candidates"), curve="teacher_curve",
              plots={"teacher_curve": {**_STEP, "y": "loss"}}, external=True, pool="gpu", checkpointed=True),
    StageSpec("rl", "alignflow.steps.train:run_rl", inputs=("curated", "base", "sft", "teacher"), outs=("rl",),
              params=("seed", "rewards", "rl"), curve="rl_curve", plots={"rl_curve": {**_STEP, "y": "reward"}},
              external=True, pool="gpu", multi_rank=True, checkpointed=True),
    StageSpec("logged", "alignflow.steps.logged:run", inputs=("curated", "sft"), outs=("logged",),
              params=("seed", "rewards", "logged"), external=True, pool="gpu"),
    StageSpec("ope", "alignflow.steps.ope:run", inputs=("curated", "logged", "sft", "rl"), outs=("ope",),
              params=("seed", "logged", "ope")),  # ope reads logged.max_new_tokens
    StageSpec("evaluate", "alignflow.steps.evaluate:run",
              inputs=("curated", "base", "sft", "rl", "logged", "ope"), outs=("reports",),
              params=("seed", "rewards", "ope", "evaluate"),  # ope.estimators and top_k: its selection metrics
              plots={"ope_vs_true": {"template": "scatter", "x": "true_value", "y": "estimate"},
                     "sharpe_ratio_at_k": {"x": "k", "y": "sharpe_ratio"}}, external=True, pool="gpu"),
]}


def run_stage(name: str, pipeline: str, task: Callable | None = None, publish: Callable | None = None) -> dict:
    """Run one stage of the table: open it, run its step inside the tracked run, write its metrics and curve,
    clear its resume state. Under torchrun the ranks other than 0 run the step only (rank 0 tracks and writes).
    `task` wraps the step's own calls (Prefect tasks); `publish(ctx, run_id, headline, table)` gets the summary."""
    from alignflow.train import distributed
    spec = STAGES[name]
    if distributed.world_size() > 1 and not spec.multi_rank:
        raise SystemExit(f"only {[s for s in STAGES if STAGES[s].multi_rank]} run on several ranks; "
                         f"run {name!r} without torchrun")
    ctx = open_stage(name, pipeline, inputs=list(spec.inputs))
    if task is not None:
        ctx.task = task
    step = spec.step()
    if not distributed.is_main():
        return step(ctx)
    started = time.time()
    with tracked(ctx, getattr(ctx.cfg, name).model_dump()) as run:
        metrics = step(ctx)
        metrics["seconds"] = round(time.time() - started, 1)
        metrics.update(_peak_gpu_memory())
        if distributed.world_size() > 1:
            metrics["world_size"] = distributed.world_size()
        ctx.task(write_metrics)(ctx, metrics, curve_name=spec.curve)
        if publish is not None:
            publish(ctx, run.info.run_id, *ctx.summary)
    if spec.checkpointed:
        import shutil
        shutil.rmtree(ctx.layout.checkpoints(name), ignore_errors=True)  # the outputs are DVC's now
    return metrics


def _peak_gpu_memory() -> dict:
    """The stage's peak GPU memory (torch's allocator, this process), when it ran on CUDA."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)}
