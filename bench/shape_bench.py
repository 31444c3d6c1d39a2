"""The product's own GPU paths at a user's shape (issue 18): a checkpoint built by bench/make_shape.py (Qwen2.5-0.5B
or 1.5B config, vocabulary 151,936, random weights) loaded through `models.load` as `base.path` loads it, then
the functions the stages call, each against its peer in the same run on the same card:

* sft      - `alignflow.train.fast:train_sft_packed`, what the SFT / teacher stages run on CUDA with bf16
             (alignflow/steps/train.py: train_sft), vs `alignflow.train.supervised:train_lm` (the same stages on
             CPU / fp32 / LoRA: padded batches through the model's own forward and loss), same examples
             (random documents of 64..900 tokens, first quarter prompt), same draws, bf16 autocast on fp32
             master weights; MFU = (6 N document tokens + causal attention FLOPs) / step time / 989.4 TFLOP/s.
* lora_sft - `supervised:train_lm` with peft LoRA r=16 (the stages' LoRA path) on the same examples.
* rollout  - `alignflow.rollout.static_engine:StaticCacheEngine.generate` on the bf16 model (chat prompts of the
             arithmetic task, n completions each, 256 new tokens, temperature 1, top_k 0) vs transformers'
             `generate(cache_implementation="static")` on the same prompt ids (it compiles its own decode step).
* rl       - `alignflow.train.rl:train_candidate` (GRPO, 8 prompts x 8 completions x 256 new tokens, static
             engine, rl.precision bf16 as a bf16 pipeline gives it: bf16 autocast update with the lm_head in chunks
             of tokens, bf16 engine weights; per-step phase timings from its own log) vs TRL's GRPOTrainer
             (bench/rl_step.py:bench_trl, bf16=True) from the same weights.
* logprobs - the update's log-probs at the rl batch (64 x (prompt + 256) tokens), forward + backward under bf16
             autocast: `alignflow.train.logprobs:policy_logprobs` (chunks of 4,096 tokens) vs the unchunked
             `alignflow.rollout:token_logprobs` ([tokens x vocab] fp32 logits): time and peak memory.
* lora_rl  - `rl:train_candidate` with LoRA r=16 (rl.lora): speed and memory vs the full fine-tune above; the
             merged-weight sync is verified by the loop itself every step (engine.sync raises WeightSyncError).

Each section records device, shape, vocab_size, parameters, peak_memory_gib (torch's allocator, reset per
side) and code_path. Writes --out as it goes (a killed run keeps what finished).

    python bench/make_shape.py --shape 0.5b --out models/shapes/qwen2.5-0.5b --device cuda
    python bench/shape_bench.py --model models/shapes/qwen2.5-0.5b --sections sft,lora_sft,rollout,rl \
        --out bench/results/shape_0.5b.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from benchio import T0, log, save  # noqa: E402

from alignflow import decoder, models  # noqa: E402
from alignflow.train import fast  # noqa: E402

PEAK = 989.4e12  # H100/H200 SXM dense bf16 (datasheet)
RESULT: dict = {}   # the JSON written by save(RESULT, args.out) after each section


def cuda() -> bool:
    return torch.cuda.is_available()


def reset_peak() -> None:
    import gc
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda() else None


def common(code_path: str) -> dict:
    return {k: RESULT[k] for k in ("device", "shape", "vocab_size", "parameters")} | {"code_path": code_path}


def load(dtype: str = "fp32"):
    return models.load(RESULT["model_dir"], "cuda" if cuda() else "cpu", dtype=dtype)


# ------------------------------------------------------------------------------------------------------------- SFT
def sft_examples(n: int, vocab: int, seed: int = 0):
    """Random documents of 64..900 tokens, the first quarter a prompt (labels IGNORE), transformers' convention."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(64, 901, (1,), generator=g))
        ids = torch.randint(0, vocab, (L,), generator=g).tolist()
        k = L // 4
        out.append((ids, [fast.IGNORE] * k + ids[k:]))
    return out


def step_docs(examples, batch: int, steps: int, seed: int) -> list[list[int]]:
    """The document lengths each step draws (the same generator calls as supervised.sft_batches/train_sft_packed)."""
    g = torch.Generator().manual_seed(seed)
    return [[len(examples[i][0]) for i in torch.randint(0, len(examples), (batch,), generator=g).tolist()]
            for _ in range(steps)]


def run_sft(trainer: str, examples, batch: int, steps: int, warm: int, seed: int = 0, lora_r: int | None = None):
    from alignflow.train import supervised
    model, tok = load()
    if lora_r:
        from alignflow.config import LoraSettings
        from alignflow import lora
        model = lora.wrap(model, LoraSettings(r=lora_r))
    reset_peak()
    g = torch.Generator().manual_seed(seed)
    stamps, logs = [], []

    def on_log(step, m):
        stamps.append(time.perf_counter())
        logs.append(m)
    with tempfile.TemporaryDirectory() as d:
        kw = dict(steps=warm + steps, lr=1e-5, ckpt_dir=Path(d), checkpoint_every=10 ** 9, on_log=on_log, desc=trainer)
        start = time.perf_counter()
        if trainer == "packed":
            fast.train_sft_packed(model, examples, batch, tok.pad_token_id, g, **kw)
        else:
            supervised.train_lm(model, supervised.sft_batches(examples, batch, tok.pad_token_id, g), g,
                                precision="bf16", **kw)
    times = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    out = {"step_s": statistics.median(times[warm:]), "step_s_all": [round(t, 4) for t in times],
           "warmup_s": round(sum(times[:warm]), 1), "loss_first_last": [logs[0]["loss"], logs[-1]["loss"]],
           "micro_batches": logs[-1].get("micro_batches"), "peak_memory_gib": peak_gib()}
    if trainer == "packed":
        out["packed_rows_per_step"] = logs[-1].get("packed_rows")
    if lora_r:
        out["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del model
    return out


def sect_sft(args) -> dict:
    vocab = RESULT["tokenizer_len"] - 3
    examples = sft_examples(4000, vocab)
    model, _ = load()
    N, _ = fast.model_flops_per_token(model)
    spec = decoder.decoder_spec(model)
    applies = fast.sft_packed_applies(model, "bf16")
    del model
    B, warm, steps = args.sft_batch, args.warmup, args.steps
    docs = step_docs(examples, B, warm + steps, 0)[warm:]
    flops = statistics.mean(6 * N * sum(d) + fast.attention_flops(spec, d) for d in docs)
    doc_tokens = statistics.mean(sum(d) for d in docs)
    res = {"stage_uses_packed_path_here": applies, "examples_per_step": B, "seq_len": 1024,
           "doc_tokens_per_step": doc_tokens, "model_flops_per_step": flops, "N_matmul_params": N,
           "mfu_definition": "(6 N doc_tokens + causal attention FLOPs) / step_s / 989.4e12"}
    for name in ("packed", "plain"):
        if time.perf_counter() - T0 > args.budget_s:
            res[name] = {"skipped": "budget"}
            continue
        try:
            r = run_sft(name, examples, B, steps, warm)
            r.update(mfu=round(flops / r["step_s"] / PEAK, 4), tokens_per_s=round(doc_tokens / r["step_s"]))
            r["code_path"] = ("alignflow.train.fast:train_sft_packed" if name == "packed"
                              else "alignflow.train.supervised:train_lm")
            res[name] = r
        except Exception:  # noqa: BLE001
            res[name] = {"error": traceback.format_exc()[-3000:]}
        log("sft", name, {k: v for k, v in res[name].items() if k != "step_s_all"})
    p, q = res.get("packed", {}), res.get("plain", {})
    if "step_s" in p and "step_s" in q:
        res["speedup_vs_plain"] = round(q["step_s"] / p["step_s"], 3)
    res.update(common("alignflow.train.fast:train_sft_packed"), mfu=p.get("mfu"),
               peak_memory_gib=p.get("peak_memory_gib"))
    return res


def sect_lora_sft(args) -> dict:
    vocab = RESULT["tokenizer_len"] - 3
    examples = sft_examples(4000, vocab)
    try:
        r = run_sft("plain", examples, args.sft_batch, args.steps, args.warmup, lora_r=16)
    except Exception:  # noqa: BLE001
        r = {"error": traceback.format_exc()[-3000:]}
    return common("alignflow.train.supervised:train_lm (peft LoRA r=16, alpha 32, all projections)") | r


# --------------------------------------------------------------------------------------------------------- rollout
def task_rows(n: int = 512):
    from alignflow.data.task import generate
    rows = generate(seed=123, n_corpus=10)["rl"][:n]
    return [r["prompt"] for r in rows], [r["answer"] for r in rows]


def ceilings() -> dict:
    from rollout import ceilings as measure  # bench/rollout.py
    return measure()


def sect_rollout(args) -> dict:
    from alignflow.rollout import Sampling
    from alignflow.rollout.static_engine import StaticCacheEngine
    from rollout import kv_bytes_per_step, weight_bytes  # bench/rollout.py
    res = {"ceilings": ceilings() if cuda() else None}
    model, tok = load("bf16")
    model.eval()
    prompts, _ = task_rows()
    n = args.group
    texts = [models.chat_prompt(tok, p) for p in prompts[:args.rollout_batch // n]]
    sampling = Sampling(max_new_tokens=args.new_tokens, temperature=1.0)
    reset_peak()
    engine = StaticCacheEngine(model, tok)
    t = time.perf_counter()
    engine.generate(texts, n, sampling)
    warm = time.perf_counter() - t
    runs = []
    for _ in range(3):
        engine.profile = True
        if cuda():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = engine.generate(texts, n, sampling)
        runs.append((time.perf_counter() - t, dict(engine.last_stats), int(out.completion_mask.shape[1])))
    engine.profile = False
    runs.sort(key=lambda r: r[0])
    secs, stats, T = runs[1]
    B = len(texts) * n
    ours = {"seconds": secs, "tok_per_s": B * T / secs, "completion_len": T, "warmup_s": warm,
            "all_runs_s": [r[0] for r in runs], "prefill_s": stats.get("prefill_s"), "decode_s": stats.get("decode_s"),
            "peak_memory_gib": peak_gib(),
            "code_path": "alignflow.rollout.static_engine:StaticCacheEngine.generate (text in, text out)"}
    if stats.get("decode_s"):
        ours["decode_ms_per_step"] = 1e3 * stats["decode_s"] / max(stats.get("steps", T) - 1, 1)
    enc = models.encode_prompts(tok, texts, model.device)
    ids, mask = enc["input_ids"].repeat_interleave(n, 0), enc["attention_mask"].repeat_interleave(n, 0)
    P = ids.shape[1]
    if res["ceilings"] and ours.get("decode_ms_per_step"):
        step_bytes = weight_bytes(model) + kv_bytes_per_step(model, B, P, T)
        ours["bandwidth_limit_ms_per_step"] = 1e3 * step_bytes / res["ceilings"]["copy_bandwidth_Bps"]
        ours["fraction_of_bandwidth_limit"] = ours["bandwidth_limit_ms_per_step"] / ours["decode_ms_per_step"]
    res["alignflow_static"] = ours
    log("rollout ours", ours)
    del engine
    reset_peak()
    if not args.skip_peer and time.perf_counter() - T0 < args.budget_s:
        stops = models.eos_ids(model, tok)
        kw = dict(max_new_tokens=T, min_new_tokens=T, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                  cache_implementation="static", pad_token_id=tok.pad_token_id, eos_token_id=stops)
        try:
            t = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=mask, **kw)
            hwarm = time.perf_counter() - t
            hruns = []
            for _ in range(2):
                if cuda():
                    torch.cuda.synchronize()
                t = time.perf_counter()
                o = model.generate(input_ids=ids, attention_mask=mask, **kw)
                if cuda():
                    torch.cuda.synchronize()
                hruns.append((time.perf_counter() - t, o.shape[1] - P))
            hruns.sort()
            secs_h, Th = hruns[0]
            res["hf_generate_static"] = {"seconds": secs_h, "tok_per_s": B * Th / secs_h, "completion_len": Th,
                                         "warmup_s": hwarm, "all_runs_s": [r[0] for r in hruns],
                                         "peak_memory_gib": peak_gib(),
                                         "code_path": "transformers generate(cache_implementation='static')"}
            res["speedup_vs_hf"] = round(ours["tok_per_s"] / res["hf_generate_static"]["tok_per_s"], 3)
        except Exception:  # noqa: BLE001
            res["hf_generate_static"] = {"error": traceback.format_exc()[-3000:]}
        log("rollout hf", res["hf_generate_static"])
    res.update(common(ours["code_path"]), batch=B, prompts=len(texts), completions_per_prompt=n, prompt_len=P,
               new_tokens=args.new_tokens, peak_memory_gib=ours["peak_memory_gib"])
    del model
    return res


# -------------------------------------------------------------------------------------------------------------- RL
def run_rl(args, lora_r: int | None = None) -> dict:
    from alignflow.config import CandidateConfig, LoraSettings, RLConfig
    from alignflow.data.rows import TaskRows
    from alignflow.rewards import RewardSet, accuracy_reward
    from alignflow import lora
    from alignflow.train import rl
    model, tok = load()
    settings = LoraSettings(r=lora_r) if lora_r else None
    if settings:
        model = lora.wrap(model, settings)
    total = args.warmup + args.steps
    cand = CandidateConfig(name="bench", algorithm="grpo", seeds=[0], steps=total, checkpoints=[total], lr=1e-6)
    cfg = RLConfig(candidates=[cand], prompts_per_step=args.prompts, group_size=args.group,
                   max_new_tokens=args.new_tokens, temperature=1.0, engine=args.engine, checkpoint_every=10 ** 6,
                   lora=settings, precision=args.rl_precision)
    prompts, answers = task_rows()
    logs = []
    reset_peak()
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        rl.train_candidate(model, tok, cand, 0, cfg, TaskRows.from_texts(prompts, answer=answers), None, Path(d),
                           on_log=lambda s, m: logs.append(m), reward_fn=RewardSet.of(accuracy_reward))
        wall = time.perf_counter() - t
    timed = logs[args.warmup:]
    med = lambda k: statistics.median(m[k] for m in timed)  # noqa: E731
    step = med("step_seconds")
    out = {"completions_per_s": round(args.prompts * args.group / step, 2), "step_s": step,
           "phases_s": {k: med(f"{k}_seconds") for k in ("rollout", "update", "sync")},
           "step_s_all": [round(m["step_seconds"], 3) for m in logs], "completion_len": med("completion_len"),
           "micro_batches": timed[-1].get("micro_batches"),
           "sync_max_abs_diff": max(m["sync_max_abs_diff"] for m in logs),
           "wall_s_with_warmup_and_final_save": round(wall, 1), "peak_memory_gib": peak_gib(),
           "precision": args.rl_precision, "logprobs": "alignflow.train.logprobs:policy_logprobs (chunks of 4096 tokens)",
           "update_optimizer_steps": timed[-1].get("optimizer_steps"),
           "code_path": "alignflow.train.rl:train_candidate" + (f" (rl.lora r={lora_r})" if lora_r else "")}
    if lora_r:
        out["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        out["sync_verified_every_step"] = True  # engine.sync raised otherwise
    del model
    return out


def sect_rl(args) -> dict:
    res = {"batch": {"prompts": args.prompts, "completions_per_prompt": args.group, "max_new_tokens": args.new_tokens},
           "engine": args.engine}
    try:
        res["alignflow"] = run_rl(args)
    except Exception:  # noqa: BLE001
        res["alignflow"] = {"error": traceback.format_exc()[-3000:]}
    log("rl ours", res["alignflow"])
    save(RESULT, args.out)
    if not args.skip_peer and time.perf_counter() - T0 < args.budget_s:
        try:
            import rl_step  # bench/rl_step.py
            import trl
            rl_step.PROMPTS, rl_step.GROUP = args.prompts, args.group
            model, tok = load()
            reset_peak()
            cps, phases = rl_step.bench_trl(model, tok, args.steps, args.new_tokens)
            res["trl"] = {"completions_per_s": round(cps, 2), "step_s": phases["step"], "peak_memory_gib": peak_gib(),
                          "code_path": f"trl {trl.__version__} GRPOTrainer (bf16=True, beta 0)"}
            del model
        except Exception:  # noqa: BLE001
            res["trl"] = {"error": traceback.format_exc()[-3000:]}
        log("rl trl", res["trl"])
    a, b = res["alignflow"], res.get("trl", {})
    if "completions_per_s" in a and "completions_per_s" in b:
        res["ratio_vs_trl"] = round(a["completions_per_s"] / b["completions_per_s"], 3)
    res.update(common("alignflow.train.rl:train_candidate"), peak_memory_gib=a.get("peak_memory_gib"))
    return res


def sect_lora_rl(args) -> dict:
    try:
        r = run_rl(args, lora_r=16)
    except Exception:  # noqa: BLE001
        r = {"error": traceback.format_exc()[-3000:]}
    full = RESULT.get("sections", {}).get("rl", {}).get("alignflow", {})
    if "step_s" in r and "step_s" in full:
        r["speed_vs_full"] = round(full["step_s"] / r["step_s"], 3)
        r["peak_memory_vs_full"] = (round(r["peak_memory_gib"] / full["peak_memory_gib"], 3)
                                    if r.get("peak_memory_gib") and full.get("peak_memory_gib") else None)
    return common(r.get("code_path", "alignflow.train.rl:train_candidate (rl.lora r=16)")) | r


def sect_logprobs(args) -> dict:
    """Forward + backward of the update's log-probs at the rl batch's shape, chunked vs unchunked."""
    from alignflow.rollout import token_logprobs
    from alignflow.train.logprobs import CHUNK, policy_logprobs
    model, tok = load()
    model.train()
    B, P, T = args.prompts * args.group, 18, args.new_tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, RESULT["tokenizer_len"] - 3, (B, P + T), generator=g).to(model.device)
    mask = torch.ones_like(ids)
    res = {"tokens": B * T, "batch": [B, P + T], "completion_len": T, "chunk": CHUNK,
           "fp32_logits_gib_if_materialised": round(B * T * RESULT["vocab_size"] * 4 / 2 ** 30, 2)}
    for name, fn in (("chunked", policy_logprobs), ("unchunked", token_logprobs)):
        try:
            times = []
            for i in range(4):
                model.zero_grad(set_to_none=True)
                reset_peak()
                if cuda():
                    torch.cuda.synchronize()
                t = time.perf_counter()
                with models.autocast("cuda" if cuda() else "cpu", "bf16"):
                    lp = fn(model, ids, mask, T, 1.0)
                lp.float().mean().backward()
                if cuda():
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            res[name] = {"fwd_bwd_s": statistics.median(times[1:]), "all_s": [round(x, 4) for x in times],
                         "peak_memory_gib": peak_gib(), "logp_mean": float(lp.detach().float().mean())}
        except Exception:  # noqa: BLE001
            res[name] = {"error": traceback.format_exc()[-2000:]}
        log("logprobs", name, res[name])
    model.zero_grad(set_to_none=True)
    del model
    res.update(common("alignflow.train.logprobs:policy_logprobs"),
               peak_memory_gib=res.get("chunked", {}).get("peak_memory_gib"))
    return res


SECTIONS = {"logprobs": sect_logprobs, "sft": sect_sft, "lora_sft": sect_lora_sft, "rollout": sect_rollout, "rl": sect_rl, "lora_rl": sect_lora_rl}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a directory built by bench/make_shape.py (or any Qwen2/Llama save)")
    ap.add_argument("--sections", default="sft,lora_sft,rollout,rl")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile, graph capture)")
    ap.add_argument("--sft-batch", type=int, default=30, help="SFT examples per step (~15k document tokens)")
    ap.add_argument("--rollout-batch", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--engine", default="static")
    ap.add_argument("--rl-precision", default="bf16", choices=["fp32", "bf16"],
                    help="rl.precision: bf16 = what a pipeline with precision bf16 runs (autocast update, bf16 engine)")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip the peers once past this many seconds")
    args = ap.parse_args()
    import transformers
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    tok = models.load_tokenizer(args.model)
    RESULT.update(device=torch.cuda.get_device_name() if cuda() else "cpu", model_dir=args.model,
                  shape=Path(args.model).name, vocab_size=cfg["vocab_size"], tokenizer_len=len(tok),
                  torch=torch.__version__, transformers=transformers.__version__,
                  command="python bench/shape_bench.py " + " ".join(sys.argv[1:]), sections={})
    from safetensors import safe_open
    with safe_open(str(Path(args.model) / "model.safetensors"), "pt") as f:
        RESULT["parameters"] = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # tied: lm_head not stored
    for name in args.sections.split(","):
        log("section", name)
        try:
            RESULT["sections"][name] = SECTIONS[name](args)
        except Exception:  # noqa: BLE001
            RESULT["sections"][name] = {"error": traceback.format_exc()[-3000:]}
        RESULT["wall_s"] = round(time.perf_counter() - T0, 1)
        save(RESULT, args.out)
    log("summary")
    for name, s in RESULT["sections"].items():
        keys = ("mfu", "speedup_vs_plain", "speedup_vs_hf", "ratio_vs_trl", "completions_per_s", "speed_vs_full",
                "peak_memory_gib", "peak_memory_vs_full", "step_s")
        log(name, {k: s.get(k) for k in keys if s.get(k) is not None} or str(s.get("error", ""))[-600:])
    return 0


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


if __name__ == "__main__":
    sys.exit(main())
