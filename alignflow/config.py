"""One validated config for `pipelines.yaml`.

Every field is documented once, here. A wrong key, type or value fails before any work starts with
a message naming the key path (`pipelines.tiny.rl.lr`) and what is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config problem, phrased for the user: key path and what is allowed."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- curate
class GeneratorConfig(Strict):
    """Sizes of the built-in arithmetic task's splits (see alignflow/data/task.py)."""
    seed: int = 0
    n_sft: int = Field(4000, ge=1, description="demonstrations with worked steps")
    n_rl: int = Field(2000, ge=1, description="RL prompts")
    n_logged: int = Field(500, ge=1, description="prompts the behaviour policy is logged on")
    n_eval: int = Field(500, ge=1, description="held-out prompts, training distribution")
    n_ood: int = Field(500, ge=1, description="held-out prompts behind a phrasing no demonstration uses")
    n_real: int = Field(300, ge=1, description="unlabelled prompts phrased as people write them")
    max_digits: int = Field(2, ge=1, le=4, description="operand digits in the training distribution")
    long_digits: int = Field(3, ge=2, le=5, description="operand digits of the occasional long problem")
    long_share: float = Field(0.15, ge=0, le=1, description="share of problems with long operands")
    n_corpus: int = Field(40000, ge=10, description="raw sums in the base model's pre-training corpus")


Split = Literal["sft", "rl", "logged", "eval", "ood", "real"]
ROW_FIELDS = ("prompt", "response", "answer", "messages", "completion")


class SourceConfig(Strict):
    """A user-supplied data file or folder: JSON Lines, Parquet, a `datasets` save_to_disk directory (Dataset or
    DatasetDict), or a folder of data files that `datasets.load_dataset` reads."""
    path: str
    split: Split = "sft"
    columns: dict[str, str] = Field(default_factory=dict, description=(
        "our field -> the file's column, e.g. {prompt: question, answer: solution}; fields: " + ", ".join(ROW_FIELDS)))
    dataset_split: str | None = Field(None, description="which split of a DatasetDict / data folder (default: `split`)")

    @model_validator(mode="after")
    def _known_fields(self):
        unknown = sorted(set(self.columns) - set(ROW_FIELDS))
        if unknown:
            raise ValueError(f"columns: unknown field(s) {unknown}; allowed: {list(ROW_FIELDS)}")
        return self


class CurateConfig(Strict):
    generator: GeneratorConfig | None = Field(default_factory=GeneratorConfig)
    sources: list[SourceConfig] = Field(default_factory=list)
    max_chars: int = Field(1024, ge=8, description="rows whose prompt+response exceed this are quarantined")
    system_prompt: str | None = Field(None, description="a system message added to every chat that has none")
    logged_share: float = Field(0.2, gt=0, lt=1, description=(
        "with no `logged` source: this share of the rl prompts is held out as the logged split"))


# ---------------------------------------------------------------- models
class TinyModelConfig(Strict):
    """Shape of the Qwen2-architecture model trained from scratch for the embedded default."""
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(512, ge=8)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must be divisible by num_heads, and num_heads by num_kv_heads")
        return self


class BaseConfig(Strict):
    path: str | None = Field(None, description="a local model directory; null trains a tiny model from scratch")
    trust_remote_code: bool = Field(False, description="allow the checkpoint's own Python code (off: safer)")
    allow_pickle: bool = Field(False, description=(
        "load .bin (pickle) weights; off: only safetensors (a pickle can run code when loaded)"))
    chat_template: str | None = Field(None, description=(
        "a Jinja chat template replacing the tokenizer's (or a file path ending in .jinja); null: the tokenizer's "
        "own, or a plain 'User:/Assistant:' template when it has none"))
    model: TinyModelConfig = Field(default_factory=TinyModelConfig)
    steps: int = Field(600, ge=1)
    batch_size: int = Field(64, ge=1)
    seq_len: int = Field(64, ge=8)
    lr: float = Field(2e-3, gt=0)
    # Whether `path` holds a loadable model is checked per pipeline, before any stage runs (alignflow/preflight.py):
    # a pipeline whose checkpoint is not built yet must not make every other pipeline's config invalid.


class LoraSettings(Strict):
    """LoRA through peft: only the adapters train; the stage's output is the merged model."""
    r: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1)


class ParallelConfig(Strict):
    """How a stage trains on several ranks (under torchrun; one process ignores it). docs/scaling.md §6."""
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description=(
        "ddp: every rank holds the whole model and optimizer state, gradients all-reduced; fsdp: FSDP2 "
        "(torch fully_shard per decoder layer) shards parameters, gradients and optimizer state over the ranks, "
        "bf16 compute with fp32 gradient reduction under precision bf16 on CUDA, sharded resume checkpoints"))
    activation_checkpointing: bool = Field(False, description=(
        "recompute each decoder layer's activations in the backward instead of keeping them (less memory, "
        "about one more forward of compute)"))


class SFTConfig(Strict):
    steps: int = Field(200, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    eval_every: int = Field(10, ge=1, description="greedy validation every N steps")
    stop_at_score: float | None = Field(
        0.5, description="stop once the greedy validation score (the pipeline's reward) reaches this (null: run all steps)")
    checkpoint_every: int = Field(50, ge=1)
    lora: LoraSettings | None = Field(None, description="train LoRA adapters instead of every weight")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)


class TeacherConfig(Strict):
    """The teacher of on-policy distillation (opd, exopd): SFT from the base model trained to convergence
    (no early stop), so it is stronger than the student's SFT starting point. Built only when a candidate
    needs one; otherwise the stage writes a marker and returns."""
    path: str | None = Field(None, description="a local model directory sharing the tokenizer; null trains one")
    steps: int = Field(600, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)


# ---------------------------------------------------------------- rewards
class RewardSpec(Strict):
    """A reward (or metric) function in TRL's convention: `(prompts, completions, **columns) -> list[float | None]`,
    every dataset column passed as a keyword argument, None = not applicable to that sample."""
    function: str = Field(description='"path/to/file.py:function" (relative to the project root) or "module:function"')
    weight: float = 1.0
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the function")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="label in metrics (default: the function's name)")
    timeout: float = Field(30.0, gt=0, description="seconds one call may take before it counts as failed")

    @model_validator(mode="after")
    def _function_form(self):
        target, sep, attr = self.function.rpartition(":")
        if not sep or not target or not attr.isidentifier():
            raise ValueError(f"function {self.function!r}: expected 'file.py:function' or 'module:function'")
        return self

    @property
    def label(self) -> str:
        return self.name or self.function.rpartition(":")[2]


ARITHMETIC_REWARDS = [RewardSpec(function="alignflow.rewards:accuracy_reward", name="accuracy")]
# The generator's task also reports whether the worked steps (not just the answer) are right.
ARITHMETIC_METRICS = ARITHMETIC_REWARDS + [RewardSpec(function="alignflow.rewards:steps_consistent")]


# ---------------------------------------------------------------- rl
class CandidateConfig(Strict):
    """One RL run; every (seed, checkpoint) pair becomes a candidate policy named `<name>-s<seed>-<step>`."""
    name: str = Field(pattern=r"^[a-z0-9_]+$")
    algorithm: str = "grpo"
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    steps: int = Field(300, ge=1)
    checkpoints: list[int] = Field(default_factory=lambda: [150, 300], min_length=1)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up (Adam's first steps are sign-like)")
    hparams: dict[str, float] = Field(default_factory=dict, description="algorithm constants, e.g. clip_eps")

    @model_validator(mode="after")
    def _checkpoints_in_range(self):
        bad = [c for c in self.checkpoints if not 1 <= c <= self.steps]
        if bad:
            raise ValueError(f"checkpoints {bad} are outside 1..steps ({self.steps})")
        return self


class RLConfig(Strict):
    candidates: list[CandidateConfig] = Field(default_factory=lambda: [CandidateConfig(name="grpo")], min_length=1)
    prompts_per_step: int = Field(16, ge=1)
    group_size: int = Field(8, ge=2, description="responses per prompt (group-relative methods need >= 2)")
    ppo_epochs: int = Field(1, ge=1, description="passes over each rollout batch (TRL num_iterations, verl ppo_epochs)")
    mini_batches: int | None = Field(None, ge=1, description=(
        "optimizer steps per pass: each rank's rollout rows split into this many mini-batches (TRL "
        "steps_per_generation, verl train_batch_size / ppo_mini_batch_size); null = the algorithm's default "
        "(docs/algorithms.md)"))
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    lora: LoraSettings | None = Field(None, description="train LoRA adapters instead of every weight")
    micro_batch_size: int | None = Field(None, ge=1, description=(
        "responses per forward/backward of the update (gradients accumulated; None = the whole batch); "
        "an out-of-memory update is retried with half as many"))
    checkpoint_every: int = Field(50, ge=1)
    solution_column: str | None = Field(None, description=(
        "the data column holding a worked solution (opsd's privileged context, pope's guidance); null: the row's "
        "demonstration, or the generator's worked steps"))
    engine: Literal["transformers", "static", "vllm"] = Field(
        "transformers", description="rollout engine; static = own decode loop with CUDA graphs (GPU), vllm = own env")
    precision: Literal["fp32", "bf16"] | None = Field(None, description=(
        "null: the pipeline's precision. bf16 on CUDA: the update under bf16 autocast (fp32 master weights) and "
        "the static engine's weights in bf16"))
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)


# ---------------------------------------------------------------- logged / ope / evaluate
class LoggedConfig(Strict):
    n_responses: int = Field(500, ge=1, description="logged responses (one per logged prompt, cycling)")
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)


Estimator = Literal["dm", "tis", "pdis", "sntis", "snpdis", "dr", "sndr"]


class SelectionConfig(Strict):
    estimator: Estimator = "snpdis"
    rule: Literal["estimate", "lower_bound"] = Field(
        "estimate", description="highest point estimate, or highest lower confidence bound")
    margin: float = Field(0.0, ge=0, description="promotion gate: beat the current champion's estimate by this")


class OPEConfig(Strict):
    estimators: list[Estimator] = Field(default_factory=lambda: ["tis", "pdis", "sntis", "snpdis"], min_length=1)
    n_bootstrap: int = Field(200, ge=10)
    ci_alpha: float = Field(0.05, gt=0, lt=1)
    select: SelectionConfig = Field(default_factory=SelectionConfig)
    top_k: int = Field(4, ge=2, description="largest k for SharpeRatio@k")
    registered_model: str | None = Field(None, description="MLflow registered model name (null: alignflow-<pipeline>)")

    @model_validator(mode="after")
    def _select_is_run(self):
        if self.select.estimator not in self.estimators:
            raise ValueError(f"select.estimator {self.select.estimator!r} must be one of estimators {self.estimators}")
        return self


class EvaluateConfig(Strict):
    metrics: list[RewardSpec] | None = Field(None, description="metrics by name, each reported per split (null: the rewards)")
    max_new_tokens: int = Field(32, ge=1)
    value_samples: int = Field(2, ge=1, description="sampled responses per eval prompt (mean@k, pass@k with k = this)")
    batch_size: int = Field(500, ge=1)


class RetrainConfig(Strict):
    """Scheduled retraining (flows/retrain.py): files dropped in `inbox` join curate.sources."""
    inbox: str = Field("data/inbox", description="folder watched for new data files (root-relative or absolute); "
                       "a subfolder named after a split (sft, rl, logged, eval, ood, real) sends its files there")
    split: Literal["sft", "rl", "logged", "eval", "ood", "real"] = Field(
        "sft", description="split of files placed directly in the inbox")
    settle_seconds: float = Field(60, ge=0, description="skip files modified more recently than this (still being written)")
    commit: bool = Field(True, description="git-commit the ingested files and the new sources (workers check out commits)")


# ---------------------------------------------------------------- pipeline
class PipelineConfig(Strict):
    seed: int = 0
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: autocast for training (fp32 master weights), bf16 weights for inference")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (null: torch's default)")
    curate: CurateConfig = Field(default_factory=CurateConfig)
    rewards: list[RewardSpec] | None = Field(None, description=(
        "the reward: a weighted sum of these functions, used by rl, logged, ope and evaluate (null: the built-in "
        "arithmetic accuracy, only with curate.generator)"))
    base: BaseConfig = Field(default_factory=BaseConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    logged: LoggedConfig = Field(default_factory=LoggedConfig)
    ope: OPEConfig = Field(default_factory=OPEConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)

    @model_validator(mode="after")
    def _cross_checks(self):
        from alignflow.algorithms import ALGORITHMS
        if self.rl.precision is None:
            self.rl.precision = self.precision
        if self.rewards is None and self.curate.generator is None:
            raise ValueError("rewards: required when curate.generator is null (name your task's reward functions, "
                             "e.g. [{function: 'rewards/mytask.py:exact_match'}])")
        if self.rewards is not None and not self.rewards:
            raise ValueError("rewards: an empty list; name at least one function")
        for i, cand in enumerate(self.rl.candidates):
            if cand.algorithm not in ALGORITHMS:
                raise ValueError(f"rl.candidates.{i}.algorithm: unknown algorithm {cand.algorithm!r}; "
                                 f"allowed: {sorted(ALGORITHMS)}")
            try:
                ALGORITHMS[cand.algorithm].hparams(cand.hparams)
            except ValueError as err:
                raise ValueError(f"rl.candidates.{i}.hparams: {err}") from None
        for stage in ("sft", "rl"):
            stage_cfg = getattr(self, stage)
            if stage_cfg.parallel.strategy == "fsdp" and stage_cfg.lora is not None:
                raise ValueError(f"{stage}.parallel.strategy: fsdp does not combine with {stage}.lora (LoRA's "
                                 "frozen base is small enough to replicate); allowed with lora: ddp")
        if self.rl.parallel.strategy == "fsdp" and self.rl.engine == "vllm":
            raise ValueError("rl.parallel.strategy: fsdp does not combine with rl.engine vllm yet (its weights "
                             "travel as a save_pretrained folder); allowed with fsdp: engine transformers or static")
        names = [c.name for c in self.rl.candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"rl.candidates: names must be unique, got {names}")
        n_candidates = sum(len(c.seeds) * len(c.checkpoints) for c in self.rl.candidates) + 1  # + SFT
        if self.ope.top_k > n_candidates:
            raise ValueError(f"ope.top_k = {self.ope.top_k} exceeds the number of candidates ({n_candidates})")
        return self

    @property
    def reward_specs(self) -> list[RewardSpec]:
        """The pipeline's reward functions (the built-in arithmetic accuracy for the generator's task)."""
        return self.rewards if self.rewards is not None else ARITHMETIC_REWARDS

    @property
    def metric_specs(self) -> list[RewardSpec]:
        """What evaluate reports per split: evaluate.metrics, else each reward function on its own."""
        if self.evaluate.metrics is not None:
            return self.evaluate.metrics
        return ARITHMETIC_METRICS if self.rewards is None else self.reward_specs

    @property
    def is_arithmetic(self) -> bool:
        """The built-in generated task (its own figures, e.g. steps-consistent, are reported only then)."""
        return self.curate.generator is not None

    def candidate_names(self) -> list[str]:
        return [f"{c.name}-s{seed}-{step}" for c in self.rl.candidates for seed in c.seeds for step in c.checkpoints]


class ProjectConfig(Strict):
    tracked: list[str] = Field(min_length=1, description="pipelines that dvc.yaml instantiates (stage@pipeline)")
    pipelines: dict[str, PipelineConfig]

    @model_validator(mode="after")
    def _tracked_exist(self):
        missing = [t for t in self.tracked if t not in self.pipelines]
        if missing:
            raise ValueError(f"tracked names unknown pipelines {missing}; defined: {sorted(self.pipelines)}")
        return self


# ---------------------------------------------------------------- loading
def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "literal_error":
            msg = f"got {e['input']!r}; allowed: {e['ctx']['expected']}"
        elif "ctx" in e and e["type"] in {"greater_than", "greater_than_equal", "less_than_equal", "less_than"}:
            msg = f"got {e['input']!r}; {e['msg'].lower()}"
        lines.append(f"{path}: {msg}")
    return "invalid pipelines.yaml:\n  " + "\n  ".join(lines)


def parse_project(raw: dict) -> ProjectConfig:
    try:
        return ProjectConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_project(path: str | Path = "pipelines.yaml") -> ProjectConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: not found (run from the project root, where dvc.yaml is)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with keys 'tracked' and 'pipelines'")
    return parse_project(raw)


def load_pipeline(name: str, path: str | Path = "pipelines.yaml") -> PipelineConfig:
    project = load_project(path)
    if name not in project.pipelines:
        raise ConfigError(f"--pipeline {name!r}: unknown; defined in {path}: {sorted(project.pipelines)}")
    return project.pipelines[name]
