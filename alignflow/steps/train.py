"""The model-producing stages' steps: base, sft, rl (no Prefect here; tasks/train.py wraps them as tasks)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import torch

from alignflow import models
from alignflow.data.task import worked_steps
from alignflow.evaluation import score
from alignflow.train import distributed, lora, rl, supervised
from alignflow.stage import StageContext, read_split


def pretrain_base(ctx: StageContext) -> dict:
    """Train the tiny base model from scratch on the curated corpus (or take the configured model path)."""
    cfg = ctx.cfg.base
    if cfg.path:  # a real checkpoint: copy it so DVC versions what the pipeline used
        model, tokenizer = models.load(cfg.path, trust_remote_code=cfg.trust_remote_code)
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
    """SFT on the demonstrations (chat template, loss on response tokens), stopping in the configured band."""
    cfg = ctx.cfg.sft
    model, tokenizer = models.load(ctx.layout.base, ctx.cfg.device)
    if cfg.lora:
        model = lora.wrap(model, cfg.lora)
    demos = read_split(ctx.layout.curated, "sft")
    n_val = min(200, len(demos) // 5)  # the last rows validate; eval/ood stay untouched for `evaluate`
    train, val = demos.iloc[:-n_val], demos.iloc[-n_val:]
    examples = supervised.sft_examples(tokenizer, train["prompt"].tolist(), train["response"].tolist())
    generator = torch.Generator().manual_seed(ctx.cfg.seed)

    def validate() -> dict:
        s = score(model, tokenizer, val["prompt"].tolist(), val["answer"].astype(str).tolist(),
                  batch_size=ctx.cfg.evaluate.batch_size)
        return {"val_accuracy": s["accuracy"], "val_steps_consistent": s["steps_consistent"]}

    target = cfg.stop_at_accuracy
    result = supervised.train_lm(
        model, supervised.sft_batches(examples, cfg.batch_size, tokenizer.pad_token_id, generator), generator,
        steps=cfg.steps, lr=cfg.lr, ckpt_dir=ctx.ckpt, checkpoint_every=cfg.checkpoint_every,
        on_log=ctx.log_step, validate=validate, validate_every=cfg.eval_every,
        stop=(lambda m: m["val_accuracy"] >= target) if target is not None else None, desc="sft",
        precision=ctx.cfg.precision)
    models.save(model, tokenizer, ctx.layout.sft)
    final = validate()
    return {"steps": result.resumed_from + result.steps_run, "stopped_early": result.stopped_early,
            "final_loss": result.last_loss, "resumed_from_step": result.resumed_from, **final}


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
    demos = read_split(layout.curated, "sft")
    examples = supervised.sft_examples(tokenizer, demos["prompt"].tolist(), demos["response"].tolist())
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    result = supervised.train_lm(
        model, supervised.sft_batches(examples, cfg.teacher.batch_size, tokenizer.pad_token_id, generator), generator,
        steps=cfg.teacher.steps, lr=cfg.teacher.lr, ckpt_dir=ckpt_dir, checkpoint_every=100, on_log=on_log,
        desc="teacher", precision=cfg.precision)
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
        prompts = read_split(ctx.layout.curated, "rl")
        rl.train_candidate(
            model, tokenizer, cand, seed, ctx.cfg.rl, prompts["prompt"].tolist(), prompts["answer"].astype(str).tolist(),
            ckpt, on_log=lambda step, m: ctx.log_step(step, m, run=f"{cand.name}-s{seed}"),
            **candidate_inputs(ctx.layout, ctx.cfg.device, cand, prompts))
        if distributed.is_main():
            done.write_text("ok")
    snapshots = [ckpt / "snapshots" / f"{cand.name}-s{seed}-{c}" for c in cand.checkpoints]
    if distributed.is_main():
        rl.publish(snapshots, ctx.layout.rl)
    distributed.barrier()  # every rank sees `done` before the next candidate
    return [s.name for s in snapshots]


def candidate_inputs(layout, device: str, cand, prompts: pd.DataFrame, teacher: Path | None = None) -> dict:
    """What a method needs beyond the policy (frozen models, worked solutions, demonstrations), as keyword
    arguments of rl.train_candidate. `teacher`: a model directory other than the teacher stage's output."""
    needs = rl.required_inputs(cand)
    frozen = lambda path: models.load(path, device)[0].eval()  # noqa: E731
    inputs = {"extra_models": rl.ExtraModels(ref=frozen(layout.sft) if "ref" in needs else None,
                                             base=frozen(layout.base) if "base" in needs else None,
                                             teacher=frozen(teacher or layout.teacher) if "teacher" in needs else None)}
    if needs & {"solutions", "privileged"}:
        inputs["solutions"] = [worked_solution(p, r) for p, r in zip(prompts["prompt"], prompts["response"])]
    if "expert" in needs:
        demos = read_split(layout.curated, "sft")
        inputs["expert"] = list(zip(demos["prompt"], demos["response"]))
    return inputs


def worked_solution(prompt: str, response: str | None) -> str:
    """The privileged solution of an RL prompt: its demonstration if it has one, else the task's worked steps."""
    if isinstance(response, str) and response:
        return response
    a, b = (int(x) for x in prompt.removesuffix("=?").split("+"))
    return worked_steps(a, b)


def clear_checkpoints(ctx: StageContext) -> None:
    """A finished stage's resume state is no longer needed (its outputs are DVC's now)."""
    shutil.rmtree(ctx.layout.checkpoints(ctx.name), ignore_errors=True)
