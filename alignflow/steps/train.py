"""The model-producing stages: base, sft, teacher, rl (`run_<stage>`, named in alignflow/stage.py's table), and
the steps they call through `ctx.task` (Prefect tasks under a flow, plain calls otherwise)."""
from __future__ import annotations

from pathlib import Path

import torch

from alignflow import models
from alignflow.data.rows import TaskRows, read_rows
from alignflow.data.task import worked_steps
from alignflow.evaluation import score
from alignflow import lora
from alignflow.train import distributed, fast, rl, sharding, supervised
from alignflow.stage import StageContext, read_split


def pretrain_base(ctx: StageContext) -> dict:
    """Train the tiny base model from scratch on the curated corpus (or take the configured model path)."""
    cfg = ctx.cfg.base
    if cfg.path:  # a real checkpoint: copy it so DVC versions what the pipeline used (with the chat template applied)
        model, tokenizer = models.load(ctx.root / cfg.path, trust_remote_code=cfg.trust_remote_code,
                                       allow_pickle=cfg.allow_pickle, chat_template=cfg.chat_template)
        models.save(model, tokenizer, ctx.layout.base)
        return {"source": cfg.path, "parameters": sum(p.numel() for p in model.parameters())}
    tokenizer = models.build_tokenizer()
    model = models.build_tiny_model(tokenizer, cfg.model).to(models.resolve_device(ctx.cfg.device))
    corpus = read_split(ctx.layout.curated, "corpus")["prompt"].tolist()
    stream = supervised.pack_corpus(tokenizer, corpus)
    generator = torch.Generator().manual_seed(ctx.cfg.seed)
    result = supervised.train_lm(
        model, supervised.packed_batches(stream, cfg.batch_size, cfg.seq_len, generator), generator,
        steps=cfg.steps, lr=cfg.lr, ckpt_dir=ctx.ckpt, checkpoint_every=100,
        on_log=lambda step, m: ctx.log_step(step, m) if step % 10 == 0 else None, desc="base",
        precision=ctx.cfg.precision)
    models.save(model, tokenizer, ctx.layout.base)
    return {"source": "tiny-from-scratch", "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": result.last_loss, "resumed_from_step": result.resumed_from, "corpus_tokens": len(stream)}


def supervised_finetune(ctx: StageContext) -> dict:
    """SFT on the demonstrations (chat template, loss on every assistant turn), validated with the pipeline's reward
    and stopped in the configured band. With no sft split (curate's missing_splits) the base model is the SFT model."""
    cfg = ctx.cfg.sft
    model, tokenizer = models.load(ctx.layout.base, ctx.cfg.device)
    if not (ctx.layout.curated / "sft.parquet").exists():
        models.save(model, tokenizer, ctx.layout.sft)
        return {"steps": 0, "skipped": "no sft split: RL starts from the base model"}
    if cfg.lora:
        model = lora.wrap(model, cfg.lora)
    train, val = _sft_split(ctx)
    n_val = len(val)
    examples = models.sft_examples(tokenizer, train.messages, train.responses,
                                       stop_ids=models.eos_ids(model, tokenizer))
    generator = torch.Generator().manual_seed(ctx.cfg.seed)

    def validate(policy=None) -> dict:   # policy: a full copy of a sharded model (FSDP), else the model itself
        if not n_val:
            return {}
        s = score(model if policy is None else policy, tokenizer, val, ctx.rewards,
                  max_new_tokens=ctx.cfg.evaluate.max_new_tokens, batch_size=ctx.cfg.evaluate.batch_size)
        return {"val_score": s["value"]}

    target = cfg.stop_at_score if n_val else None
    result = train_sft(
        model, tokenizer, examples, cfg.batch_size, generator, ctx.cfg.precision,
        steps=cfg.steps, lr=cfg.lr, ckpt_dir=ctx.ckpt, checkpoint_every=cfg.checkpoint_every,
        on_log=ctx.log_step, validate=validate, validate_every=cfg.eval_every,
        stop=(lambda m: m["val_score"] >= target) if target is not None else None, desc="sft",
        parallel=cfg.parallel)
    models.save(model, tokenizer, ctx.layout.sft)   # every rank: a sharded model is gathered to rank 0, which writes
    if not distributed.is_main():
        return {}
    # the output as the next stage loads it: a sharded model's consolidated save, else the model in memory
    final = validate(models.load(ctx.layout.sft, ctx.cfg.device)[0] if sharding.is_sharded(model) else None)
    return {"steps": result.resumed_from + result.steps_run, "stopped_early": result.stopped_early,
            "final_loss": result.last_loss, "resumed_from_step": result.resumed_from, **final}


def train_sft(model, tokenizer, examples, batch_size: int, generator: torch.Generator, precision: str,
              **kw) -> supervised.TrainResult:
    """The SFT / teacher training loop. On CUDA with precision bf16 and a plain Qwen2/Llama-family decoder
    (fast.sft_packed_applies): the packed varlen trainer, fast.train_sft_packed (same draws, loss, schedule and
    checkpoints; docs/performance.md), in one process. Everywhere else (CPU, fp32, LoRA, several ranks):
    supervised.train_lm, its `parallel` setting deciding how the ranks train."""
    if fast.sft_packed_applies(model, precision) and distributed.world_size() == 1:
        kw.pop("parallel", None)
        return fast.train_sft_packed(model, examples, batch_size, tokenizer.pad_token_id, generator, **kw)
    return supervised.train_lm(model, supervised.sft_batches(examples, batch_size, tokenizer.pad_token_id, generator),
                               generator, precision=precision, **kw)


def _sft_split(ctx: StageContext, n_val_max: int = 200) -> tuple[TaskRows, TaskRows]:
    """(training demonstrations, validation rows). The reward scores validation, so its rows must carry the columns
    the reward functions read: the demonstrations' last rows when they have the rl split's columns (the generator's
    task), else the first rl prompts (chat demonstrations often carry no answer column). eval/ood stay untouched."""
    demos = read_rows(ctx.layout.curated, "sft")
    rl_rows = read_rows(ctx.layout.curated, "rl")
    n_val = min(n_val_max, len(demos) // 5)
    if set(rl_rows.columns) <= set(demos.columns):
        return demos.take(list(range(len(demos) - n_val))), demos.take(list(range(len(demos) - n_val, len(demos))))
    return demos, rl_rows.take(list(range(min(n_val, len(rl_rows)))))


def build_teacher(ctx: StageContext) -> dict:
    """The distillation teacher: a given path, or SFT from base run to the end; a marker when no method needs it."""
    cfg, out = ctx.cfg.teacher, ctx.layout.teacher
    needed = any("teacher" in rl.required_inputs(c) for c in ctx.cfg.rl.candidates)
    if not needed:
        out.mkdir(parents=True, exist_ok=True)
        (out / "NOT_NEEDED").write_text("no rl candidate of this pipeline needs a teacher\n")
        return {"built": False}
    if cfg.path:
        model, tokenizer = models.load(cfg.path)
        models.save(model, tokenizer, out)
        return {"built": True, "source": cfg.path}
    result = train_teacher(ctx.layout, ctx.cfg, out, ctx.ckpt, ctx.log_step)
    return {"built": True, "source": "sft-to-convergence", "final_loss": result.last_loss}


def train_teacher(layout, cfg, out: Path, ckpt_dir: Path, on_log) -> supervised.TrainResult:
    """SFT from the base model, run to the end (no early stop), saved to `out`."""
    model, tokenizer = models.load(layout.base, cfg.device)
    demos = read_rows(layout.curated, "sft")
    examples = models.sft_examples(tokenizer, demos.messages, demos.responses, stop_ids=models.eos_ids(model, tokenizer))
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    result = train_sft(
        model, tokenizer, examples, cfg.teacher.batch_size, generator, cfg.precision,
        steps=cfg.teacher.steps, lr=cfg.teacher.lr, ckpt_dir=ckpt_dir, checkpoint_every=100, on_log=on_log,
        desc="teacher")
    models.save(model, tokenizer, out)
    return result


def train_rl_candidate(ctx: StageContext, candidate_index: int, seed: int) -> list[str]:
    """One RL run (candidate config x seed); its checkpoints become candidates `<name>-s<seed>-<step>`."""
    cand = ctx.cfg.rl.candidates[candidate_index]
    ckpt = ctx.ckpt / f"{cand.name}-s{seed}"
    done = ckpt / "done"
    if not done.exists():
        model, tokenizer = models.load(ctx.layout.sft, ctx.cfg.device)
        if ctx.cfg.rl.lora:
            model = lora.wrap(model, ctx.cfg.rl.lora)
        rows = read_rows(ctx.layout.curated, "rl")
        rl.train_candidate(
            model, tokenizer, cand, seed, ctx.cfg.rl, rows, None, ckpt,
            on_log=lambda step, m: ctx.log_step(step, m, run=f"{cand.name}-s{seed}"), reward_fn=ctx.rewards,
            **candidate_inputs(ctx.layout, ctx.cfg.device, cand, rows, solution_column=ctx.cfg.rl.solution_column))
        if distributed.is_main():
            done.write_text("ok")
    snapshots = [ckpt / "snapshots" / f"{cand.name}-s{seed}-{c}" for c in cand.checkpoints]
    if distributed.is_main():
        rl.publish(snapshots, ctx.layout.rl)
    distributed.barrier()  # every rank sees `done` before the next candidate
    return [s.name for s in snapshots]


def candidate_inputs(layout, device: str, cand, rows: TaskRows, teacher: Path | None = None,
                     solution_column: str | None = None, ref: Path | None = None) -> dict:
    """What a method needs beyond the policy (frozen models, worked solutions, demonstrations), as keyword
    arguments of rl.train_candidate. `teacher`: a model directory other than the teacher stage's output; `ref`:
    one other than the SFT model (e.g. G-OPD's reward correction: the teacher's own pre-RL model).
    Worked solutions (opsd's privileged context, pope's guidance) come from `solution_column` when named."""
    needs = rl.required_inputs(cand)
    frozen = lambda path: models.load(path, device)[0].eval()  # noqa: E731
    inputs = {"extra_models": rl.ExtraModels(ref=frozen(ref or layout.sft) if "ref" in needs else None,
                                             base=frozen(layout.base) if "base" in needs else None,
                                             teacher=frozen(teacher or layout.teacher) if "teacher" in needs else None)}
    if needs & {"solutions", "privileged"}:
        if solution_column:
            inputs["solutions"] = [str(s) if s is not None else "" for s in rows.column(solution_column)]
        else:
            responses = rows.responses or [None] * len(rows)
            inputs["solutions"] = [worked_solution(p, r) for p, r in zip(rows.prompts, responses)]
    if "expert" in needs:
        demos = read_rows(layout.curated, "sft")
        inputs["expert"] = list(zip(demos.prompts, demos.responses))
    return inputs


def worked_solution(prompt: str, response: str | None) -> str:
    """The privileged solution of an RL prompt: its demonstration if it has one, else (the built-in arithmetic task)
    the worked steps; any other task must name its solution column (rl.solution_column)."""
    if isinstance(response, str) and response:
        return response
    try:
        a, b = (int(x) for x in prompt.removesuffix("=?").split("+"))
    except ValueError:
        raise ValueError(f"prompt {prompt[:60]!r} has no demonstration to use as its solution; name the data column "
                         "that holds one with rl.solution_column") from None
    return worked_steps(a, b)


def run_base(ctx: StageContext) -> dict:
    metrics = ctx.task(pretrain_base)(ctx)
    ctx.summary = (f"base model: {metrics['parameters']:,} parameters", [metrics])
    return metrics


def run_sft(ctx: StageContext) -> dict:
    metrics = ctx.task(supervised_finetune)(ctx)
    ctx.summary = (f"validation score {metrics.get('val_score', float('nan')):.3f}", [metrics])
    return metrics


def run_teacher(ctx: StageContext) -> dict:
    metrics = ctx.task(build_teacher)(ctx)
    ctx.summary = ("teacher built" if metrics["built"] else "no teacher needed", [metrics])
    return metrics


def run_rl(ctx: StageContext) -> dict:
    """Every (candidate config x seed) run in turn; each run's configured checkpoints become candidates."""
    candidates = []
    for i, cand in enumerate(ctx.cfg.rl.candidates):
        for seed in cand.seeds:
            candidates += ctx.task(train_rl_candidate)(ctx, i, seed)
    final = {row["run"]: row["reward"] for row in ctx.curve}  # the last logged reward of each run
    ctx.summary = (f"{len(candidates)} candidates", [{"run": k, "final_reward": v} for k, v in final.items()])
    return {"candidates": candidates, "final_reward": final}
