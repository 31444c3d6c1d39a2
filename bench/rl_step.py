"""One GRPO step, alignflow vs TRL's GRPOTrainer, in one process and one run (bench only; TRL is not a
runtime dependency: `pip install -e .[bench]`).

Same model (the tiny pipeline's SFT model, or a freshly built model of --shape), same task (rl prompts of the
arithmetic task), same batch (8 prompts x 8 completions = 64 completions of up to --new-tokens new tokens), one
update epoch, beta = 0, temperature 1, same learning rate. Writes bench/results/rl_step.json:
{"alignflow_completions_per_s", "trl_completions_per_s", "ratio", "phases": {...}}.

    python bench/rl_step.py [--model models/tiny/sft] [--steps 6]                  # CPU, the tiny SFT model
    python bench/rl_step.py --device cuda --engine static --shape 0.5b --new-tokens 256 \
        --out bench/results/rl_step_gpu.json                                         # GPU (issue 7)

alignflow's side is `rl.train_candidate` itself (the RL stage's function, code_path in the JSON) with the engine the
stage builds; TRL trains fp32 master weights under bf16 autocast on CUDA (bf16=True). The GPU figures at users'
shapes come from bench/shape_bench.py, which uses this file's `bench_trl` for the peer.
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
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing (the GPU machine)

import torch  # noqa: E402

from alignflow import models  # noqa: E402
from alignflow.config import RLConfig, TinyModelConfig  # noqa: E402
from alignflow.data.task import generate  # noqa: E402
from alignflow.rewards import accuracy_reward  # noqa: E402
from alignflow.train import rl  # noqa: E402

PROMPTS, GROUP, LR = 8, 8, 1e-4
SHAPES = {"tiny": TinyModelConfig(),  # Qwen2.5-0.5B's decoder shape (our char-level vocabulary instead of 151,936)
          "0.5b": TinyModelConfig(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864)}
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12}  # dense bf16 FLOP/s (datasheet)


def load_policy(path: str | None, shape: str, device: str, new_tokens: int):
    if path and (Path(path) / "config.json").exists():
        model, tok = models.load(path)
    else:
        tok = models.build_tokenizer()
        torch.manual_seed(0)
        model = models.build_tiny_model(tok, SHAPES[shape], max_positions=64 + new_tokens)
    return model.to(models.resolve_device(device)), tok


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def task_rows(n: int = 512):
    rows = generate(seed=123, n_corpus=10)["rl"][:n]
    return [r["prompt"] for r in rows], [r["answer"] for r in rows]


def bench_alignflow(model, tok, steps: int, engine_name: str, new_tokens: int) -> tuple[float, dict]:
    """`rl.train_candidate` itself, the RL stage's function (GRPO, one optimizer step per rollout like TRL's default,
    the engine the stage would build: `make_engine(engine_name, model, tok)`), timed by its own per-step phase
    figures; the first step is warm-up (compile, graph capture)."""
    from alignflow.config import CandidateConfig
    from alignflow.data.rows import TaskRows
    from alignflow.rewards import RewardSet
    prompts, answers = task_rows()
    total = steps + 1
    cand = CandidateConfig(name="bench", algorithm="grpo", seeds=[0], steps=total, checkpoints=[total], lr=LR)
    cfg = RLConfig(candidates=[cand], prompts_per_step=PROMPTS, group_size=GROUP, max_new_tokens=new_tokens,
                   temperature=1.0, engine=engine_name, checkpoint_every=10 ** 6, mini_batches=1)
    logs = []
    with tempfile.TemporaryDirectory() as d:
        rl.train_candidate(model, tok, cand, 0, cfg, TaskRows.from_texts(prompts, answer=answers), None, Path(d),
                           on_log=lambda s, m: logs.append(m), reward_fn=RewardSet.of(accuracy_reward))
    timed = logs[1:]
    mean = lambda k: statistics.mean(m[k] for m in timed)  # noqa: E731
    step = mean("step_seconds")
    return PROMPTS * GROUP / step, {"generate_and_reward": mean("rollout_seconds"), "update": mean("update_seconds"),
                                    "weight_sync": mean("sync_seconds"), "step": step,
                                    "completion_tokens": mean("completion_len") * PROMPTS * GROUP,
                                    "max_sync_diff": max(m["sync_max_abs_diff"] for m in logs)}


def bench_trl(model, tok, steps: int, new_tokens: int) -> tuple[float, dict]:
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from alignflow.models import chat_prompt
    _hash = datasets.fingerprint.Hasher.hash

    def hash_or_random(cls, value):  # some images' pyarrow types fail to pickle in datasets' fingerprinting
        try:
            return _hash(value)
        except Exception:  # noqa: BLE001 (a fingerprint only names cache files; a random one is correct)
            return datasets.fingerprint.generate_random_fingerprint()
    datasets.fingerprint.Hasher.hash = classmethod(hash_or_random)
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
                          max_completion_length=new_tokens, max_steps=steps + 1, learning_rate=LR, beta=0.0,
                          temperature=1.0, top_k=0, num_iterations=1, logging_steps=1, report_to="none",
                          use_cpu=model.device.type == "cpu", bf16=model.device.type == "cuda", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
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
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--engine", default="transformers", choices=["transformers", "static"])
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES), help="model built when --model is absent")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    model, tok = load_policy(args.model, args.shape, args.device, args.new_tokens)
    n_params = sum(p.numel() for p in model.parameters())
    ours, phases = bench_alignflow(model, tok, args.steps, args.engine, args.new_tokens)
    del model
    model, tok = load_policy(args.model, args.shape, args.device, args.new_tokens)  # TRL starts from the same weights
    theirs, trl_phases = bench_trl(model, tok, args.steps, args.new_tokens)
    import trl
    on_cuda = args.device == "cuda"
    device = torch.cuda.get_device_name(0) if on_cuda else platform.processor() or platform.machine()
    result = {"peer": f"trl {trl.__version__} GRPOTrainer", "device": device,
              "code_path": "alignflow.train.rl:train_candidate", "vocab_size": model.config.vocab_size,
              "threads": torch.get_num_threads(), "engine": args.engine, "parameters": n_params,
              "model": args.model if Path(args.model).exists() else f"{args.shape} shape (random init)",
              "batch": {"prompts": PROMPTS, "completions_per_prompt": GROUP, "max_new_tokens": args.new_tokens},
              "alignflow_completions_per_s": round(ours, 2), "trl_completions_per_s": round(theirs, 2),
              "ratio": round(ours / theirs, 3), "ratio_vs_trl": round(ours / theirs, 3),
              "phases_s": {"alignflow": {k: round(v, 4) for k, v in phases.items()},
                           "trl": {k: round(v, 4) for k, v in trl_phases.items()}},
              "command": "python bench/rl_step.py " + " ".join(sys.argv[1:])}
    peak = next((v for k, v in PEAK_BF16.items() if k in device), None)
    if on_cuda and peak:  # hardware fraction: model FLOPs of the step (2N per sampled token, 6N per trained one)
        flops = 8 * n_params * phases["completion_tokens"]
        result["mfu_alignflow"] = round(flops / phases["step"] / peak, 4)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
