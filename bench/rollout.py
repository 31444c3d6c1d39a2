"""Rollout throughput: alignflow's StaticCacheEngine vs transformers `generate(cache_implementation="static")`,
same model, same prompts, same run (GPU only). Writes bench/results/rollout.json.

Model: Qwen2-architecture with Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads / 2 KV heads, intermediate
4864, vocab 151936, tied embeddings), random init, built locally in bf16 with sdpa. Prompts: random ids, 16..64
tokens, left-padded to 64; 256 new tokens, temperature 1, top_k 0. Batches 64 and 256.

Also: correctness on CUDA with compile + CUDA graphs (tiny fp32 model: greedy == `generate`, log-probs ==
teacher-forced forward; 0.5B bf16: log-probs vs teacher-forced), the copy-bandwidth and bf16-matmul ceilings, and
the fraction of the memory-bandwidth limit (bytes of weights + live KV read per decode step / measured bandwidth).

    PYTHONPATH=. python bench/rollout.py [--out bench/results/rollout.json] [--batches 64 256] [--new-tokens 256]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from benchio import cuda_ms, log, save  # noqa: E402
import transformers  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from alignflow.rollout.engine import Sampling, token_logprobs  # noqa: E402
from alignflow.rollout.static_engine import StaticCacheEngine  # noqa: E402

EOS, PAD = 151645, 151643
RESULT: dict = {}   # the JSON written by save(RESULT, args.out) after each section


def ceilings() -> dict:
    n = 1 << 29  # 2 GiB of fp32 per buffer, far over L2
    xs = [torch.rand(n, device="cuda") for _ in range(2)]
    y = torch.empty_like(xs[0])
    i = [0]

    def copy():
        y.copy_(xs[i[0] % 2])
        i[0] += 1
    ms = cuda_ms(copy, reps=10)
    bw = 2 * n * 4 / (ms * 1e-3)
    del xs, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms_mm = cuda_ms(lambda: a @ b, reps=10)
    del a, b
    torch.cuda.empty_cache()
    return {"copy_bandwidth_Bps": bw, "bf16_matmul_flops": 2 * 8192 ** 3 / (ms_mm * 1e-3)}


def build_05b(dtype=torch.bfloat16) -> Qwen2ForCausalLM:
    kw = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
              tie_word_embeddings=True, bos_token_id=PAD, eos_token_id=EOS, pad_token_id=PAD,
              attn_implementation="sdpa")
    try:
        cfg = Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **kw)
    except Exception:  # noqa: BLE001
        cfg = Qwen2Config(rope_theta=1000000.0, **kw)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    return model


def build_tiny() -> Qwen2ForCausalLM:
    cfg = Qwen2Config(vocab_size=48, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=3, pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(40.0)  # sharp argmax margins
    m.generation_config.eos_token_id, m.generation_config.pad_token_id = 3, 0
    return m


def prompts(B: int, vocab: int, P: int = 64, lo: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, P + 1, (B,), generator=g)
    ids = torch.randint(4, vocab - 400 if vocab > 1000 else vocab, (B, P), generator=g)
    mask = (torch.arange(P)[None] >= (P - lens)[:, None]).long()
    ids = ids.masked_fill(mask == 0, PAD if vocab > 1000 else 0)
    return ids.cuda(), mask.cuda()


def correctness_tiny(fuse_weights: bool = True) -> dict:
    m = build_tiny()
    ids, mask = prompts(16, 48, P=12, lo=3, seed=1)
    out = {}
    eng = StaticCacheEngine(m, None, eos_token_id=3, pad_token_id=0, fuse_weights=fuse_weights)
    got = eng.generate_ids(ids, mask, Sampling(max_new_tokens=40, greedy=True))
    want = m.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=40, pad_token_id=0,
                      eos_token_id=3)[:, ids.shape[1]:]
    out["greedy_equal_hf_generate"] = bool(got["completion"].shape == want.shape and torch.equal(got["completion"], want))
    out["greedy_rows_finished_early"] = int((got["completion_mask"].sum(-1) < 40).sum())
    for temp in (1.0, 0.7):
        torch.manual_seed(2)
        r = eng.generate_ids(ids, mask, Sampling(max_new_tokens=40, temperature=temp))
        full = torch.cat([ids, r["completion"]], 1)
        fmask = torch.cat([mask, r["completion_mask"]], 1)
        with torch.no_grad():
            ref = token_logprobs(m, full, fmask, r["completion"].shape[1], temp)
        cm = r["completion_mask"].bool()
        out[f"logprob_max_abs_diff_T{temp}"] = float((ref - r["logprobs"])[cm].abs().max())
    out["graphs_used"] = eng.cuda_graphs and eng.last_stats.get("graphs", 0) > 0
    out["compiled"] = eng.compile
    out["pass"] = out["greedy_equal_hf_generate"] and all(v < 1e-4 for k, v in out.items() if k.startswith("logprob_max"))
    return out


def kv_bytes_per_step(model, B: int, P: int, T: int) -> float:
    c = model.config
    D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_col = c.num_hidden_layers * 2 * c.num_key_value_heads * D * 2  # K and V, bf16
    live = [P + t for t in range(1, T)]
    return B * per_col * (sum(live) / len(live) + 1)  # read the live columns, write one


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    if not model.config.tie_word_embeddings:
        total -= model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
    return total


def time_ours(engine, ids, mask, T, runs=3) -> dict:
    s = Sampling(max_new_tokens=T, temperature=1.0)
    t = time.perf_counter()
    engine.generate_ids(ids, mask, s)  # warm-up: compile + graph capture
    torch.cuda.synchronize()
    warm = time.perf_counter() - t
    engine.profile = True
    res = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = engine.generate_ids(ids, mask, s)
        torch.cuda.synchronize()
        res.append((time.perf_counter() - t, dict(engine.last_stats), out))
    engine.profile = False
    res.sort(key=lambda r: r[0])
    secs, stats, out = res[len(res) // 2]
    steps = stats["steps"]
    return {"seconds": secs, "tokens": ids.shape[0] * steps, "tok_per_s": ids.shape[0] * steps / secs,
            "steps": steps, "prefill_s": stats.get("prefill_s"), "decode_s": stats.get("decode_s"),
            "decode_ms_per_step": 1e3 * stats["decode_s"] / max(steps - 1, 1) if stats.get("decode_s") else None,
            "warmup_s": warm, "all_runs_s": [r[0] for r in res], "graphs": stats.get("graphs"), "_out": out}


def kernel_class(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("fmha", "flash", "attention", "attn")):
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk", "gemv")):
        return "gemm"
    if "triton" in n:
        return "triton (fused pointwise/reductions)"
    if any(k in n for k in ("exponential", "philox", "distribution", "random")):
        return "random"
    if any(k in n for k in ("index", "copy", "fill", "cat", "elementwise", "reduce", "where")):
        return "eager pointwise/copies"
    return "other"


def profile_kernels(fn, reps: int) -> dict:
    """GPU time per call by kernel class and the top kernels (torch.profiler, CUDA activity only)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t and e.count:
            rows.append((e.key, t / reps, e.count / reps))
    classes: dict = {}
    for name, t, c in rows:
        k = kernel_class(name)
        classes.setdefault(k, [0.0, 0.0])
        classes[k][0] += t
        classes[k][1] += c
    rows.sort(key=lambda r: -r[1])
    return {"gpu_us_per_call": sum(r[1] for r in rows),
            "kernels_per_call": sum(r[2] for r in rows),
            "by_class_us_and_count": {k: [round(v[0], 1), round(v[1], 1)] for k, v in classes.items()},
            "top": [[n[:90], round(t, 1), round(c, 1)] for n, t, c in rows[:18]]}


@torch.no_grad()
def profile_decode(engine, P: int, Sb: int) -> dict:
    st = engine._state
    out = {}

    def reset():
        st["col"].fill_(P)
        st["t"].fill_(1)
        st["pos"].fill_(P)

    def eager_steps():
        reset()
        for _ in range(4):
            engine._step(Sb, False)
    out["step_compiled_no_graph"] = profile_kernels(eager_steps, 1)
    out["step_compiled_no_graph"]["note"] = "4 steps per call"
    g = engine._graphs.get((False, Sb))
    if g is not None:
        def replays():
            reset()
            for _ in range(4):
                g.replay()
        out["graph_replay_4_steps"] = profile_kernels(replays, 1)
        reset()
        torch.cuda.synchronize()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        ev[0].record()
        for _ in range(50):
            g.replay()
        ev[1].record()
        torch.cuda.synchronize()
        out["graph_replay_ms_per_step"] = ev[0].elapsed_time(ev[1]) / 50
    return out


def time_hf(model, ids, mask, T, runs=2) -> dict:
    kw = dict(max_new_tokens=T, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, cache_implementation="static",
              pad_token_id=PAD, eos_token_id=EOS)
    t = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=mask, **kw)
    torch.cuda.synchronize()
    warm = time.perf_counter() - t
    res = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        torch.cuda.synchronize()
        res.append((time.perf_counter() - t, out.shape[1] - ids.shape[1]))
    res.sort()
    secs, n = res[len(res) // 2]
    return {"seconds": secs, "tokens": ids.shape[0] * n, "tok_per_s": ids.shape[0] * n / secs, "steps": n,
            "warmup_s": warm, "all_runs_s": [r[0] for r in res]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench/results/rollout.json"))
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 64])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--unfused", action="store_true", help="also time the engine without fused projections")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip the remaining peer/variant runs past this")
    ap.add_argument("--variants", action="store_true", help="also time eager and compile-only at the first batch")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "GPU benchmark"
    T = args.new_tokens
    RESULT.update(device=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
                  command="PYTHONPATH=. python bench/rollout.py " + " ".join(sys.argv[1:]),
                  peer='transformers generate(cache_implementation="static", do_sample=True, top_k=0)',
                  model="Qwen2 architecture, Qwen2.5-0.5B shape, random init, bf16, sdpa",
                  new_tokens=T, prompt_len="16..64 random, left-padded to 64", batches={})
    t0 = time.perf_counter()
    RESULT["ceilings"] = ceilings()
    log("ceilings", RESULT["ceilings"])
    for key, fw in (("correctness_tiny_fp32_cuda", True), ("correctness_tiny_fp32_cuda_unfused", False)):
        try:
            RESULT[key] = correctness_tiny(fw)
        except Exception:  # noqa: BLE001
            RESULT[key] = {"error": traceback.format_exc()[-3000:]}
        log(key, RESULT[key])
    save(RESULT, args.out)
    model = build_05b()
    n_params = sum(p.numel() for p in model.parameters())
    wbytes = weight_bytes(model)
    RESULT.update(params=n_params, weight_bytes=wbytes)
    probe = torch.randint(0, 150000, (1, 48), generator=torch.Generator().manual_seed(3)).cuda()
    engine = StaticCacheEngine(model, None, eos_token_id=EOS, pad_token_id=PAD, probe_ids=probe)
    try:
        RESULT["sync_probe_max_abs_diff_bf16"] = engine.sync(model)
    except Exception as exc:  # noqa: BLE001  (bf16 kernels differ; record, don't stop the benchmark)
        RESULT["sync_probe_max_abs_diff_bf16"] = repr(exc)
    bw = RESULT["ceilings"]["copy_bandwidth_Bps"]
    for B in args.batches:
        ids, mask = prompts(B, 151936)
        P = ids.shape[1]
        entry = RESULT["batches"].setdefault(str(B), {})
        try:
            ours = time_ours(engine, ids, mask, T)
            out = ours.pop("_out")
            if "bf16_logprob_check" not in RESULT:  # sampled log-probs vs teacher-forced bf16 forward, 8 rows
                full = torch.cat([ids[:8], out["completion"][:8]], 1)
                fm = torch.cat([mask[:8], out["completion_mask"][:8]], 1)
                with torch.no_grad():
                    ref = token_logprobs(model, full, fm, out["completion"].shape[1])
                cm = out["completion_mask"][:8].bool()
                d = (ref - out["logprobs"][:8])[cm].abs()
                RESULT["bf16_logprob_check"] = {"mean_abs_diff": float(d.mean()), "max_abs_diff": float(d.max()),
                                                "mean_logprob": float(ref[cm].mean())}
            step_bytes = wbytes + kv_bytes_per_step(model, B, P, T)
            ours["bytes_per_decode_step"] = step_bytes
            ours["bandwidth_limit_ms_per_step"] = 1e3 * step_bytes / bw
            if ours.get("decode_ms_per_step"):
                ours["fraction_of_bandwidth_limit"] = ours["bandwidth_limit_ms_per_step"] / ours["decode_ms_per_step"]
            entry["alignflow_static"] = ours
        except Exception:  # noqa: BLE001
            entry["alignflow_static"] = {"error": traceback.format_exc()[-3000:]}
        log(B, "ours", {k: v for k, v in entry["alignflow_static"].items() if k != "all_runs_s"})
        save(RESULT, args.out)
        if B == args.batches[0]:
            try:
                entry["profile"] = profile_decode(engine, P, 192)
            except Exception:  # noqa: BLE001
                entry["profile"] = {"error": traceback.format_exc()[-2000:]}
            log(B, "profile", json.dumps(entry["profile"])[:1500])
            if args.unfused:
                try:
                    e2 = StaticCacheEngine(model, None, eos_token_id=EOS, pad_token_id=PAD, probe_ids=probe,
                                           fuse_weights=False)
                    r = time_ours(e2, ids, mask, T)
                    r.pop("_out")
                    entry["alignflow_static_unfused"] = r
                    del e2
                except Exception:  # noqa: BLE001
                    entry["alignflow_static_unfused"] = {"error": traceback.format_exc()[-2000:]}
                log(B, "unfused", entry["alignflow_static_unfused"])
            save(RESULT, args.out)
        if not args.skip_peer and time.perf_counter() - t0 < args.budget_s:
            try:
                entry["hf_generate_static"] = time_hf(model, ids, mask, T)
            except Exception:  # noqa: BLE001
                entry["hf_generate_static"] = {"error": traceback.format_exc()[-3000:]}
            log(B, "hf", entry["hf_generate_static"])
            o, h = entry.get("alignflow_static", {}), entry.get("hf_generate_static", {})
            if "tok_per_s" in o and "tok_per_s" in h:
                entry["speedup_vs_hf"] = o["tok_per_s"] / h["tok_per_s"]
        save(RESULT, args.out)
        log(f"elapsed {time.perf_counter() - t0:.0f}s")
    if args.variants and time.perf_counter() - t0 < args.budget_s:
        B = args.batches[0]
        ids, mask = prompts(B, 151936)
        for name, kw in (("compile_no_graphs", dict(compile=True, cuda_graphs=False)),
                         ("eager_no_compile", dict(compile=False, cuda_graphs=False))):
            try:
                e = StaticCacheEngine(model, None, eos_token_id=EOS, pad_token_id=PAD, probe_ids=probe, **kw)
                r = time_ours(e, ids, mask, T, runs=1)
                r.pop("_out")
                RESULT["batches"][str(B)][name] = r
            except Exception:  # noqa: BLE001
                RESULT["batches"][str(B)][name] = {"error": traceback.format_exc()[-2000:]}
            log(B, name, RESULT["batches"][str(B)][name])
            save(RESULT, args.out)
    RESULT["speedup_vs_hf"] = {b: e.get("speedup_vs_hf") for b, e in RESULT["batches"].items()}
    RESULT["wall_s"] = time.perf_counter() - t0
    save(RESULT, args.out)
    log("\nbatch  ours tok/s   hf tok/s   speedup  ms/step  frac-of-BW-limit")
    for b, e in RESULT["batches"].items():
        o, h = e.get("alignflow_static", {}), e.get("hf_generate_static", {})
        log(f"{b:>5}  {o.get('tok_per_s', float('nan')):>10.0f} {h.get('tok_per_s', float('nan')):>10.0f} "
            f"{e.get('speedup_vs_hf') or float('nan'):>8.2f} {o.get('decode_ms_per_step') or float('nan'):>8.3f} "
            f"{o.get('fraction_of_bandwidth_limit') or float('nan'):>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
