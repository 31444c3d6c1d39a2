"""SFT training-step model FLOPs utilisation: alignflow.train.fast vs a plain transformers step, same model, same
tokens, same run (GPU only). Writes bench/results/sft_mfu.json.

Model: Qwen2-architecture, Qwen2.5-0.5B shape (see bench/rollout.py), random init, fp32 master weights, bf16
autocast. Data: random documents of 64..900 tokens (the first quarter of each is prompt: no loss), packed
first-fit-decreasing into rows of 1,024 tokens; one optimizer step = 2 micro-batches of 8 rows (16,384 positions).

* peer ("plain transformers"): `model(input_ids, attention_mask, labels).loss` on the packed rows as plain
  sequences (sdpa, full causal attention over each row, logits for every position, the loss upcast to fp32),
  backward, clip_grad_norm_, torch.optim.AdamW (foreach);
* alignflow: FastSFTTrainer - position ids restart per document, varlen flash attention (block-diagonal causal),
  per-layer torch.compile, fused [q;k;v] and [gate;up] GEMMs, chunked linear+cross-entropy (8,192 rows at a
  time), fused AdamW, same clipping.

MFU = (6 * N * tokens + causal attention FLOPs of the documents) / step time / peak, N = decoder matmul params +
lm_head (embedding lookup excluded), tokens = document tokens (padding tails excluded); the same numerator for
both. Peak: 989.4 TFLOP/s (H100/H200 SXM dense bf16 datasheet); `mfu_vs_measured_matmul` uses the 8192^3 bf16
matmul rate measured in the same run.

    PYTHONPATH=. python bench/sft_mfu.py [--out bench/results/sft_mfu.json] [--steps 5]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
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
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from alignflow import decoder  # noqa: E402
from alignflow.train import fast  # noqa: E402

PEAK = 989.4e12
SEQ, ROWS, MICRO = 1024, 8, 2
RESULT: dict = {}   # the JSON written by save(RESULT, args.out) after each section


def matmul_ceiling() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192 ** 3 / (cuda_ms(lambda: a @ b) * 1e-3)


def build_05b() -> Qwen2ForCausalLM:
    kw = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
              tie_word_embeddings=True, attn_implementation="sdpa", attention_dropout=0.0)
    try:
        cfg = Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **kw)
    except Exception:  # noqa: BLE001
        cfg = Qwen2Config(rope_theta=1000000.0, **kw)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return Qwen2ForCausalLM(cfg).train()


def make_examples(n_tokens: int, seed: int, vocab: int = 151000):
    g = torch.Generator().manual_seed(seed)
    out, total = [], 0
    while total < n_tokens:
        L = int(torch.randint(64, 901, (1,), generator=g))
        ids = torch.randint(0, vocab, (L,), generator=g).tolist()
        k = L // 4
        out.append((ids, [fast.IGNORE] * k + ids[k:]))
        total += L
    return out


def make_steps(n_steps: int, seed: int = 0, rows: int = ROWS, micro: int = MICRO):
    """n_steps optimizer steps, each `micro` packed batches of `rows` rows (rows filled by first-fit-decreasing)."""
    exs = make_examples(int(n_steps * micro * rows * SEQ * 1.02), seed)
    batches = fast.pack_examples(exs, SEQ, pad_id=0, rows_per_batch=rows)
    batches = [b for b in batches if b.input_ids.shape[0] == rows]
    steps = [batches[i:i + micro] for i in range(0, len(batches) - micro + 1, micro)][:n_steps]
    return [[b.to("cuda") for b in s] for s in steps]


def hf_labels(b: fast.PackedBatch) -> torch.Tensor:
    """transformers' convention: labels aligned with inputs, shifted inside the loss -> labels[j+1] = targets[j]."""
    return torch.cat([torch.full_like(b.targets[:, :1], fast.IGNORE), b.targets[:, :-1]], 1)


def flops_of(step, N: int, spec) -> tuple[float, int, int]:
    doc = [n for b in step for n in b.doc_lengths]
    toks = sum(doc)
    return 6 * N * toks + fast.attention_flops(spec, doc), toks, sum(b.input_ids.numel() for b in step)


def timed(fn, steps, warmup: int) -> dict:
    for s in steps[:warmup]:
        fn(s)
    torch.cuda.synchronize()
    times = []
    for s in steps[warmup:]:
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn(s)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times), "all_steps_s": times,
            "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2 ** 30}


def plain_step_fn(model, opt):
    def step(micro):
        for b in micro:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=b.input_ids, attention_mask=torch.ones_like(b.input_ids),
                             labels=hf_labels(b)).loss / len(micro)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def kernel_class(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("fmha", "flash", "attention", "attn")):
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk", "gemv")):
        return "gemm"
    if "adam" in n or "multi_tensor" in n or "foreach" in n:
        return "optimizer / grad-norm"
    if "triton" in n:
        return "triton (fused pointwise/reductions)"
    return "other eager kernels"


def profile_step(fn, step) -> dict:
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(step)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t and e.count:
            rows.append((e.key, t, e.count))
    classes: dict = {}
    for name, t, c in rows:
        k = kernel_class(name)
        classes.setdefault(k, [0.0, 0])
        classes[k][0] += t / 1e3
        classes[k][1] += c
    rows.sort(key=lambda r: -r[1])
    return {"gpu_ms": sum(r[1] for r in rows) / 1e3, "kernels": sum(r[2] for r in rows),
            "by_class_ms_and_count": {k: [round(v[0], 2), v[1]] for k, v in classes.items()},
            "top": [[n[:90], round(t / 1e3, 2), c] for n, t, c in rows[:20]]}


def correctness(model) -> dict:
    """bf16 autocast on CUDA: packed varlen + compiled loss vs per-document transformers forward; chunked CE vs full."""
    out = {"varlen": fast.varlen_note()}
    m_ref, m_fast = copy.deepcopy(model), copy.deepcopy(model)
    exs = make_examples(int(ROWS * SEQ * 1.02), seed=7)
    rows = fast.pack_rows(exs, SEQ)[:ROWS]  # same shape as the timed micro-batches: the compiled layer is reused
    b = fast.collate_packed(exs, rows, SEQ, pad_id=0).to("cuda")
    used = [exs[i] for row in rows for i in row]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ff = fast.FastForward(m_fast)
        loss = ff.loss(b)
    loss.backward()
    total, count = 0.0, 0
    for ids, labels in used:
        x = torch.tensor([ids[:SEQ]], device="cuda")
        y = torch.tensor(labels[1:SEQ], device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = m_ref(input_ids=x).logits[0, :-1].float()
        total = total + F.cross_entropy(logits, y, ignore_index=fast.IGNORE, reduction="sum")
        count += int((y != fast.IGNORE).sum())
    ref = total / count
    ref.backward()
    g1 = torch.cat([p.grad.float().flatten() for p in m_fast.parameters()])
    g2 = torch.cat([p.grad.float().flatten() for p in m_ref.parameters()])
    out.update(attention=ff.attention, compiled=ff.compile, packed_loss=float(loss), per_doc_loss=float(ref),
               loss_rel_diff=abs(float(loss) - float(ref)) / float(ref),
               grad_cosine=float(F.cosine_similarity(g1, g2, dim=0)), grad_rel_norm_diff=float((g1 - g2).norm() / g2.norm()))
    del m_ref, m_fast, g1, g2
    # chunked CE vs full CE (bf16 inputs)
    h = torch.randn(6000, 896, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(151936, 896, device="cuda") * 0.02).requires_grad_()
    y = torch.randint(0, 151936, (6000,), device="cuda")
    y[::5] = fast.IGNORE
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = fast.chunked_cross_entropy(h, w, y, chunk=4096)
    ga = torch.autograd.grad(a, (h, w))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        r = F.cross_entropy((h @ w.t()).float(), y, ignore_index=fast.IGNORE)
    gr = torch.autograd.grad(r, (h, w))
    out.update(chunked_ce_abs_diff=float((a - r).abs()),
               chunked_ce_grad_cosine=[float(F.cosine_similarity(x.float().flatten(), z.float().flatten(), dim=0))
                                       for x, z in zip(ga, gr)])
    out["pass"] = (out["loss_rel_diff"] < 2e-2 and out["grad_cosine"] > 0.99 and out["chunked_ce_abs_diff"] < 1e-2
                   and min(out["chunked_ce_grad_cosine"]) > 0.999)
    torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench/results/sft_mfu.json"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--variants", action="store_true",
                    help="also time the fast step without fused projections (chunk 4096) and with 16 rows x 1")
    ap.add_argument("--autotune", action="store_true", help="with --variants: also compile max-autotune (slow)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip remaining variants past this many seconds")
    args = ap.parse_args()
    t0 = time.perf_counter()
    RESULT.update(device=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
                  command="PYTHONPATH=. python bench/sft_mfu.py " + " ".join(sys.argv[1:]),
                  peer="plain transformers step: model(input_ids, attention_mask, labels).loss, sdpa, bf16 autocast, "
                       "clip_grad_norm_, torch.optim.AdamW (foreach)",
                  setup={"seq_len": SEQ, "rows_per_micro_batch": ROWS, "micro_batches_per_step": MICRO,
                         "precision": "fp32 master weights, bf16 autocast"},
                  peak_flops=PEAK)
    RESULT["measured_bf16_matmul_flops"] = matmul_ceiling()
    model = build_05b()
    N, _ = fast.model_flops_per_token(model)
    spec = decoder.decoder_spec(model)
    RESULT["N_matmul_params"] = N
    fast.varlen_available("cuda")
    try:
        RESULT["correctness"] = correctness(model)
    except Exception:  # noqa: BLE001
        RESULT["correctness"] = {"error": traceback.format_exc()[-3000:]}
    log("correctness", RESULT["correctness"])
    save(RESULT, args.out)
    warm_plain, warm_fast = 2, 3
    steps = make_steps(max(warm_plain, warm_fast) + args.steps)
    flops = [flops_of(s, N, spec) for s in steps]
    RESULT["tokens_per_step"] = statistics.mean(f[1] for f in flops)
    RESULT["positions_per_step"] = flops[0][2]

    def mfu(entry, warm):
        f = statistics.mean(x[0] for x in flops[warm:])
        entry["model_flops_per_step"] = f
        entry["achieved_flops"] = f / entry["step_s"]
        entry["mfu"] = entry["achieved_flops"] / PEAK
        entry["mfu_vs_measured_matmul"] = entry["achieved_flops"] / RESULT["measured_bf16_matmul_flops"]
        entry["tokens_per_s"] = statistics.mean(x[1] for x in flops[warm:]) / entry["step_s"]
        return entry

    # peer
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
        torch.cuda.reset_peak_memory_stats()
        RESULT["plain_transformers"] = mfu(timed(plain_step_fn(model, opt), steps[:warm_plain + args.steps], warm_plain),
                                           warm_plain)
        try:
            RESULT["plain_transformers_profile"] = profile_step(plain_step_fn(model, opt), steps[0])
        except Exception:  # noqa: BLE001
            RESULT["plain_transformers_profile"] = {"error": traceback.format_exc()[-2000:]}
        del opt
    except Exception:  # noqa: BLE001
        RESULT["plain_transformers"] = {"error": traceback.format_exc()[-3000:]}
    log("plain", RESULT["plain_transformers"])
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    save(RESULT, args.out)
    # alignflow fast
    try:
        tr = fast.FastSFTTrainer(model, lr=1e-5, weight_decay=0.01)
        torch.cuda.reset_peak_memory_stats()
        RESULT["alignflow_fast"] = mfu(timed(tr.step, steps[:warm_fast + args.steps], warm_fast), warm_fast)
        RESULT["alignflow_fast"].update(attention=tr.fwd.attention, compiled=tr.fwd.compile,
                                        fused_adamw=bool(tr.optimizer.param_groups[0].get("fused")),
                                        chunk=tr.chunk, fused_projections=True)
        try:
            RESULT["alignflow_fast_profile"] = profile_step(tr.step, steps[0])
        except Exception:  # noqa: BLE001
            RESULT["alignflow_fast_profile"] = {"error": traceback.format_exc()[-2000:]}
        log("fast profile", json.dumps(RESULT["alignflow_fast_profile"])[:2500])
        del tr
    except Exception:  # noqa: BLE001
        RESULT["alignflow_fast"] = {"error": traceback.format_exc()[-3000:]}
    log("fast", RESULT["alignflow_fast"])
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    save(RESULT, args.out)
    if args.variants:
        variants = [("alignflow_fast_unfused_chunk4096", dict(fuse_projections=False, chunk=4096), None),
                    ("alignflow_fast_rows16x1", {}, "rows16")]
        if args.autotune:
            variants.append(("alignflow_fast_max_autotune", dict(compile_mode="max-autotune-no-cudagraphs"), None))
        steps16 = None
        for name, kw, data in variants:
            if time.perf_counter() - t0 > args.budget_s:
                RESULT[name] = {"skipped": "time budget"}
                continue
            try:
                if data == "rows16":
                    steps16 = steps16 or make_steps(warm_fast + 3, seed=1, rows=2 * ROWS, micro=1)
                    use = steps16
                else:
                    use = steps[:warm_fast + 3]
                tr = fast.FastSFTTrainer(model, lr=1e-5, weight_decay=0.01, **kw)
                torch.cuda.reset_peak_memory_stats()
                flops_v = [flops_of(s, N, spec) for s in use]
                e = timed(tr.step, use, warm_fast)
                f = statistics.mean(x[0] for x in flops_v[warm_fast:])
                e.update(model_flops_per_step=f, achieved_flops=f / e["step_s"], mfu=f / e["step_s"] / PEAK,
                         mfu_vs_measured_matmul=f / e["step_s"] / RESULT["measured_bf16_matmul_flops"],
                         tokens_per_s=statistics.mean(x[1] for x in flops_v[warm_fast:]) / e["step_s"], config=kw)
                RESULT[name] = e
                del tr
            except Exception:  # noqa: BLE001
                RESULT[name] = {"error": traceback.format_exc()[-3000:]}
            log(name, RESULT[name])
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            save(RESULT, args.out)
    p, f = RESULT.get("plain_transformers", {}), RESULT.get("alignflow_fast", {})
    RESULT["mfu"] = f.get("mfu")
    if "step_s" in p and "step_s" in f:
        RESULT["speedup_vs_plain"] = p["step_s"] / f["step_s"]
    RESULT["wall_s"] = time.perf_counter() - t0
    save(RESULT, args.out)
    log("\nvariant                step ms    MFU   MFU/meas.matmul  tok/s")
    for k in ("plain_transformers", "alignflow_fast", "alignflow_fast_unfused_chunk4096", "alignflow_fast_rows16x1",
              "alignflow_fast_max_autotune"):
        e = RESULT.get(k)
        if e and "step_s" in e:
            log(f"{k:<22} {1e3 * e['step_s']:>8.1f} {e['mfu']:>6.3f} {e['mfu_vs_measured_matmul']:>10.3f} "
                f"{e['tokens_per_s']:>10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
