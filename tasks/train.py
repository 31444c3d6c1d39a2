"""Tasks of the model-producing stages: base, sft, rl."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import torch
from prefect import task

from alignflow import models
from alignflow.evaluation import score
from alignflow.train import rl, supervised
from tasks.common import StageContext


@task
def pretrain_base(ctx: StageContext) -> dict:
    """Train the tiny base model from scratch on the curated corpus (or take the configured model path)."""
    cfg = ctx.cfg.base
    if cfg.path:  # a real checkpoint: copy it so DVC versions what the pipeline used
        model, tokenizer = models.load(cfg.path)
        models.save(model, tokenizer, ctx.layout.base)
        return {"source": cfg.path, "parameters": sum(p.numel() for p in model.parameters())}
    tokenizer = models.build_tokenizer()
    model = models.build_tiny_model(tokenizer, cfg.model)
    corpus = pd.read_parquet(ctx.layout.curated / "corpus.parquet")["prompt"].tolist()
    stream = supervised.pack_corpus(tokenizer, corpus)
    generator = torch.Generator().manual_seed(ctx.cfg.seed)
    result = supervised.train_lm(
        model, supervised.packed_batches(stream, cfg.batch_size, cfg.seq_len, generator), generator,
        steps=cfg.steps, lr=cfg.lr, ckpt_dir=ctx.ckpt, checkpoint_every=100,
        on_log=lambda step, m: ctx.log_step(step, m) if step % 10 == 0 else None, desc="base")
    models.save(model, tokenizer, ctx.layout.base)
    return {"source": "tiny-from-scratch", "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": result.last_loss, "resumed_from_step": result.resumed_from, "corpus_tokens": len(stream)}


@task
def supervised_finetune(ctx: StageContext) -> dict:
    """SFT on the demonstrations (chat template, loss on response tokens), stopping in the configured band."""
    cfg = ctx.cfg.sft
    model, tokenizer = models.load(ctx.layout.base)
    demos = pd.read_parquet(ctx.layout.curated / "sft.parquet")
    n_val = min(200, len(demos) // 5)  # the last rows validate; eval/ood stay untouched for `evaluate`
    train, val = demos.iloc[:-n_val], demos.iloc[-n_val:]
    examples = supervised.sft_examples(tokenizer, train["prompt"].tolist(), train["response"].tolist())
    generator = torch.Generator().manual_seed(ctx.cfg.seed)

    def validate() -> dict:
        s = score(model, tokenizer, val["prompt"].tolist(), val["answer"].astype(str).tolist())
        return {"val_accuracy": s["accuracy"], "val_steps_consistent": s["steps_consistent"]}

    target = cfg.stop_at_accuracy
    result = supervised.train_lm(
        model, supervised.sft_batches(examples, cfg.batch_size, tokenizer.pad_token_id, generator), generator,
        steps=cfg.steps, lr=cfg.lr, ckpt_dir=ctx.ckpt, checkpoint_every=cfg.checkpoint_every,
        on_log=ctx.log_step, validate=validate, validate_every=cfg.eval_every,
        stop=(lambda m: m["val_accuracy"] >= target) if target is not None else None, desc="sft")
    models.save(model, tokenizer, ctx.layout.sft)
    final = validate()
    return {"steps": result.resumed_from + result.steps_run, "stopped_early": result.stopped_early,
            "final_loss": result.last_loss, "resumed_from_step": result.resumed_from, **final}


@task
def train_rl_candidate(ctx: StageContext, candidate_index: int, seed: int) -> list[str]:
    """One RL run (candidate config x seed); its checkpoints become candidates `<name>-s<seed>-<step>`."""
    cand = ctx.cfg.rl.candidates[candidate_index]
    ckpt = ctx.ckpt / f"{cand.name}-s{seed}"
    done = ckpt / "done"
    if not done.exists():
        model, tokenizer = models.load(ctx.layout.sft)
        prompts = pd.read_parquet(ctx.layout.curated / "rl.parquet")
        needs_ref = ctx.cfg.rl.candidates[candidate_index].hparams.get("beta", 0) > 0
        ref = models.load(ctx.layout.sft)[0].eval() if needs_ref else None
        rl.train_candidate(model, tokenizer, cand, seed, ctx.cfg.rl, prompts["prompt"].tolist(),
                           prompts["answer"].astype(str).tolist(), ckpt,
                           on_log=lambda step, m: ctx.log_step(step, m, run=f"{cand.name}-s{seed}"), ref_model=ref)
        done.write_text("ok")
    snapshots = [ckpt / "snapshots" / f"{cand.name}-s{seed}-{c}" for c in cand.checkpoints]
    rl.publish(snapshots, ctx.layout.rl)
    return [s.name for s in snapshots]


def clear_checkpoints(ctx: StageContext) -> None:
    """A finished stage's resume state is no longer needed (its outputs are DVC's now)."""
    shutil.rmtree(ctx.layout.checkpoints(ctx.name), ignore_errors=True)
