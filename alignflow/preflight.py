"""Pre-flight of one pipeline, before any stage runs: the model directories load (config, weights, tokenizer,
chat template renders), the reward and metric functions import and return numbers on a few of the data's own
rows, the data files exist. `alignflow check-config --pipeline NAME` prints it; `alignflow run` refuses to start
on a problem. Each problem names the key, file or function."""
from __future__ import annotations

from pathlib import Path

from alignflow.config import PipelineConfig

SAMPLE_ROWS = 4


def _sample_rows(root: Path, cfg: PipelineConfig):
    """A few rows of the first rl/eval source (or the generator), normalised as curate would; None if unreadable
    (curate then reports the file itself)."""
    from alignflow.data import curate
    from alignflow.data.rows import TaskRows
    for source in cfg.curate.sources:
        if source.split in ("rl", "eval"):
            try:
                rows, _ = curate.read_source(Path(root) / source.path, source.split, cfg.curate.max_chars,
                                             columns=source.columns, dataset_split=source.dataset_split)
            except Exception:  # noqa: BLE001  (curate names a bad file; here it only costs the sample)
                return None
            if rows:
                return TaskRows.from_records(rows[:SAMPLE_ROWS])
    if cfg.curate.generator is not None:
        from alignflow.data import task
        gen = task.generate(n_sft=1, n_rl=SAMPLE_ROWS, n_logged=1, n_eval=1, n_ood=1, n_real=1, n_corpus=10)
        return TaskRows.from_texts([r["prompt"] for r in gen["rl"]], answer=[r["answer"] for r in gen["rl"]])
    return None


def check(root: Path, name: str, cfg: PipelineConfig) -> tuple[list[str], dict]:
    """(problems, summary) for pipeline `name`."""
    from alignflow import models
    from alignflow.rewards import RewardError, RewardSet
    problems, summary = [], {}
    for source in cfg.curate.sources:
        if not (Path(root) / source.path).exists():
            problems.append(f"pipelines.{name}.curate.sources: {source.path}: no such file or directory")
    for key, model_cfg in (("base", cfg.base), ("teacher", cfg.teacher)):
        if model_cfg.path is None:
            continue
        try:
            summary[key] = models.check_model(
                Path(root) / model_cfg.path, trust_remote_code=getattr(model_cfg, "trust_remote_code", False),
                allow_pickle=getattr(model_cfg, "allow_pickle", False),
                chat_template=getattr(model_cfg, "chat_template", None))
        except models.ModelError as err:
            problems.append(f"pipelines.{name}.{key}.path: {err}")
    sample = _sample_rows(root, cfg)
    for key, specs in (("rewards", cfg.reward_specs), ("evaluate.metrics", cfg.metric_specs)):
        try:
            reward = RewardSet(specs, Path(root), key=key)
        except RewardError as err:
            problems.append(f"pipelines.{name}.{key}: {err}")
            continue
        summary[key] = reward.labels
        if sample is not None:
            completions = [r if isinstance(r, str) else "" for r in (sample.responses or [""] * len(sample))]
            problems += [f"pipelines.{name}.{key}: {p}" for p in reward.check(sample.prompts, completions, sample.columns)]
    return problems, summary
