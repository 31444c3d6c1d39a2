"""One GRPO step, alignflow vs TRL's GRPOTrainer, in one process and one run (bench only; TRL is not a
runtime dependency: `pip install -e .[bench]`).

Same model (the tiny pipeline's SFT model, or a freshly built tiny model), same task (rl prompts of the
arithmetic task), same batch (8 prompts x 8 completions = 64 completions of up to 32 new tokens), one
update epoch, beta = 0, temperature 1, same learning rate. Writes bench/results/rl_step.json:
{"alignflow_completions_per_s", "trl_completions_per_s", "ratio", "phases": {...}}.

    python bench/rl_step.py [--model models/tiny/sft] [--steps 6]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from alignflow import models  # noqa: E402
from alignflow.algorithms import ADVANTAGES, ALGORITHMS, LOSS_AGGS, POLICY_LOSSES  # noqa: E402
from alignflow.config import RLConfig, TinyModelConfig  # noqa: E402
from alignflow.data.task import generate  # noqa: E402
from alignflow.rewards import accuracy_reward  # noqa: E402
from alignflow.train import rl  # noqa: E402

PROMPTS, GROUP, NEW_TOKENS, LR = 8, 8, 32, 1e-4


def load_policy(path: str | None):
    if path and (Path(path) / "config.json").exists():
        return models.load(path)
    tok = models.build_tokenizer()
    return models.build_tiny_model(tok, TinyModelConfig()), tok


def task_rows(n: int = 512):
    rows = generate(seed=123, n_corpus=10)["rl"][:n]
    return [r["prompt"] for r in rows], [r["answer"] for r in rows]


def bench_alignflow(model, tok, steps: int) -> tuple[float, dict]:
    """The real loop's pieces, timed per phase (the same calls train_candidate makes)."""
    from alignflow.rollout import make_engine, token_logprobs
    prompts, answers = task_rows()
    cfg = RLConfig(prompts_per_step=PROMPTS, group_size=GROUP, max_new_tokens=NEW_TOKENS)
    algo = ALGORITHMS["grpo"]
    hp = algo.hparams({})
    engine = make_engine("transformers", model, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    phases = {k: [] for k in ("generate", "reward", "reference_logprobs", "update", "weight_sync")}
    step_times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        idx = [(step * PROMPTS + i) % len(prompts) for i in range(PROMPTS)]
        t = time.perf_counter()
        batch, _ = rl._rollout_batch(engine, tok, [prompts[i] for i in idx], [answers[i] for i in idx], cfg,
                                     accuracy_reward)
        t_gen_reward = time.perf_counter() - t
        t = time.perf_counter()
        accuracy_reward([prompts[i] for i in idx for _ in range(GROUP)], ["A:0"] * len(batch.rewards),
                        answer=[answers[i] for i in idx for _ in range(GROUP)])
        t_reward = time.perf_counter() - t
        t = time.perf_counter()
        T, mask = batch.completion_len, batch.completion_mask.float()
        adv = ADVANTAGES[algo.advantage](batch, hp)
        logp = token_logprobs(model, batch.input_ids, batch.attention_mask, T)
        batch.old_logprobs = logp.detach()
        loss = LOSS_AGGS[algo.loss_agg](POLICY_LOSSES[algo.policy_loss](logp, batch, adv, hp)[0], mask, hp)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        t_update = time.perf_counter() - t
        t = time.perf_counter()
        engine.sync(model)
        t_sync = time.perf_counter() - t
        if step == 0:
            continue  # warm-up
        step_times.append(time.perf_counter() - t0)
        for k, v in (("generate", t_gen_reward - t_reward), ("reward", t_reward), ("reference_logprobs", 0.0),
                     ("update", t_update), ("weight_sync", t_sync)):
            phases[k].append(v)
    mean_step = statistics.mean(step_times)
    return PROMPTS * GROUP / mean_step, {k: statistics.mean(v) for k, v in phases.items()} | {"step": mean_step}


def bench_trl(model, tok, steps: int) -> tuple[float, dict]:
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from alignflow.models import chat_prompt
    prompts, answers = task_rows()
    ds = datasets.Dataset.from_dict({"prompt": [chat_prompt(tok, p) for p in prompts], "answer": answers})

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.last = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.last)

    def reward(prompts, completions, answer, **kw):
        return accuracy_reward(prompts, completions, answer=answer)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
                          max_completion_length=NEW_TOKENS, max_steps=steps + 1, learning_rate=LR, beta=0.0,
                          temperature=1.0, top_k=0, num_iterations=1, logging_steps=1, report_to="none",
                          use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                          lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0, seed=0)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                              callbacks=[timer])
        trainer.train()
    mean_step = statistics.mean(timer.times[1:])
    return PROMPTS * GROUP / mean_step, {"step": mean_step}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / "models/tiny/sft"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=str(ROOT / "bench/results/rl_step.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tok = load_policy(args.model)
    ours, phases = bench_alignflow(model, tok, args.steps)
    model, tok = load_policy(args.model)  # TRL starts from the same weights
    theirs, trl_phases = bench_trl(model, tok, args.steps)
    import trl
    result = {"peer": f"trl {trl.__version__} GRPOTrainer", "device": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "model": args.model if Path(args.model).exists() else "tiny (random init)",
              "batch": {"prompts": PROMPTS, "completions_per_prompt": GROUP, "max_new_tokens": NEW_TOKENS},
              "alignflow_completions_per_s": round(ours, 2), "trl_completions_per_s": round(theirs, 2),
              "ratio": round(ours / theirs, 3),
              "phases_s": {"alignflow": {k: round(v, 4) for k, v in phases.items()},
                           "trl": {k: round(v, 4) for k, v in trl_phases.items()}},
              "command": "python bench/rl_step.py " + " ".join(sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
