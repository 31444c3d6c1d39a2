"""Every registered on-policy method from the same SFT model, several seeds: held-out greedy accuracy.

    python bench/compare_methods.py --pipeline tiny --steps 100 --seeds 0 1 2 --workers 2
    python bench/compare_methods.py --split hard --methods grpo pope     # POPE's claim, on the hard split

--split hard trains on the task generator's hard split (alignflow.data.task.hard_split: 3-digit + 3-digit sums,
where most of the SFT model's GRPO groups are all-zero) and scores unguided greedy accuracy on its held-out part;
it also reports the share of all-zero reward groups in the first and last quarter of training.

Each (method, seed) is one run of the one RL loop (alignflow/train/rl.py) with the pipeline's RL settings
(`rl` in pipelines.yaml: prompts per step, group size, temperature, ...) and the learning rate of its first
candidate; each method keeps its paper's defaults (docs/algorithms.md). Inputs come from a finished run of the
pipeline (curated splits, base and SFT models); the distillation teacher (opd, exopd) is trained here the way
the `teacher` stage does it when the pipeline did not need one. Results: bench/results/methods_<p>.json, the
table between the `methods` markers of docs/results.md (`methods-<tag>` for --out methods_<p>_<tag>.json), and
docs/img/<the JSON's name>.png. Partial results are
kept in the JSON as runs finish, and a rerun skips the runs already there.

Per run the JSON also keeps `mechanisms`: the mean over the run's steps of what the RL loop logs about each method's
own mechanisms (clip fraction over generated tokens, OPMD's proximal gradient factor tau |s - s_old|, the KL, DAPO's
dynamic sampling, POPE's guidance, CHORD's mu), which the docs table reports as a column. On a GPU box without
scipy or matplotlib, run with --no-report (bench/compare_methods_device.sh) and write the docs later with
--report-only where they are.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from stats import mean_ci  # noqa: E402  (95% t-interval without scipy: the GPU boxes have none)


def teacher_dir(pipeline: str) -> Path:
    from alignflow.layout import Layout
    built = Layout(ROOT, pipeline).teacher
    return built if (built / "config.json").exists() else ROOT / "checkpoints" / pipeline / "compare" / "teacher"


HARD_SIZES = {"n_train": 400, "n_eval": 200}
# the order runs start in: most work per step first (dynamic sampling or guided re-rolls, frozen-model passes)
COST_ORDER = ["dapo", "pope", "srppo", "opsd", "chord", "empg", "opd", "exopd", "dcpo", "grpo", "dr_grpo", "opmd",
              "asymre"]


def write_json(path: Path, data: dict) -> None:
    """Whole or not at all (a run stopped mid-write keeps the previous file)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def splits_of(layout, split: str) -> tuple:
    """(training prompts, {name: held-out rows to score}) of the standard splits or of the hard split."""
    import pandas as pd

    from alignflow.stage import read_split
    if split == "standard":
        return read_split(layout.curated, "rl"), {name: read_split(layout.curated, name) for name in ("eval", "ood")}
    from alignflow.data.task import hard_split
    curated = {p for name in ("sft", "rl", "logged", "eval", "ood") for p in read_split(layout.curated, name)["prompt"]}
    hard = hard_split(seed=0, exclude=curated, **HARD_SIZES)
    return pd.DataFrame(hard["train"]), {"hard": pd.DataFrame(hard["eval"])}


def scores(model, tok, held_out: dict, per_prompt: bool = False) -> dict:
    """Greedy accuracy and steps-consistent share per held-out split (per_prompt: also each prompt's 0/1
    accuracy as a string, `<split>_correct`)."""
    from alignflow.data.rows import TaskRows
    from alignflow.evaluation import score
    from alignflow.rewards import RewardSet, accuracy_reward, steps_consistent
    result, reward, steps = {}, RewardSet.of(accuracy_reward), RewardSet.of(steps_consistent)
    for name, rows in held_out.items():
        s = score(model, tok, TaskRows.from_frame(rows), reward, metrics=steps)
        result[f"{name}_accuracy"] = s["value"]
        result[f"{name}_steps_consistent"] = sum(s["per_function"]["steps_consistent"]) / max(1, len(s["texts"]))
        if per_prompt:
            result[f"{name}_correct"] = "".join("1" if r > 0 else "0" for r in s["rewards"])
    return result


# What the RL loop logs about each method's own mechanisms (alignflow/algorithms/): averaged over a run's steps
MECHANISM_KEYS = ("optimizer_steps", "mini_batches", "clip_frac", "opmd/prox_grad", "opmd/drift_sq",
                  "advantage_abs_mean", "kl", "tis_ratio_mean", "tis_ratio_max", "dcpo/upper_mean", "dapo/kept_groups",
                  "dapo/refill_tries", "dapo/sampled_prompts", "chord/mu", "chord/sft_nll", "pope/guided_groups",
                  "pope/still_failed_groups", "pope/unguided_failed_groups", "skipped_updates", "grad_norm")


def mechanisms_of(logs: list[dict]) -> dict:
    """Per run: the mean of each logged mechanism metric over its steps, and the clip fraction and OPMD's proximal
    gradient factor per quarter of the run."""
    out = {}
    for key in MECHANISM_KEYS:
        values = [m[key] for m in logs if key in m]
        if values:
            out[key] = sum(values) / len(values)
    quarter = max(1, len(logs) // 4)
    for key in ("clip_frac", "opmd/prox_grad"):
        if any(key in m for m in logs):
            out[f"{key}_by_quarter"] = [sum(m.get(key, 0.0) for m in logs[i:i + quarter]) / len(logs[i:i + quarter])
                                        for i in range(0, len(logs), quarter)][:4]
    return out


@dataclass(frozen=True)
class RunSpec:
    """One (method, seed) run from the pipeline's SFT model. The first six fields are compare_methods' job tuple;
    the rest are the claims benchmark's variations of a method (bench/claims.py)."""
    pipeline: str
    method: str                     # the run's name in the results
    seed: int
    steps: int
    device: str = "cpu"
    split: str = "standard"
    algorithm: str | None = None    # the registered preset (default: method)
    hparams: tuple = ()             # (name, value) pairs of the preset's hparams
    teacher: str | None = None      # distillation teacher directory (default: teacher_dir(pipeline))
    ref: str | None = None          # reference model directory (default: the SFT model)
    rl: tuple = ()                  # (key, value) overrides of the pipeline's rl settings, e.g. prompts_per_step
    grad_mask: str | None = None    # a changed set (bench/subnetwork.py): train only those elements
    save_mask: str | None = None    # write this run's changed set here
    per_prompt: bool = False        # keep each held-out prompt's correctness (paired bootstrap)


def run_one(job: tuple) -> dict:
    return run_spec(RunSpec(*job))


def run_spec(spec: RunSpec) -> dict:
    import torch

    from alignflow import models
    from alignflow.config import CandidateConfig, load_pipeline
    from alignflow.data.rows import TaskRows
    from alignflow.layout import Layout
    from alignflow.steps.train import candidate_inputs
    from alignflow.train import rl
    torch.set_num_threads(1)
    cfg = load_pipeline(spec.pipeline, ROOT / "pipelines.yaml")
    rl_cfg = cfg.rl.model_copy(update=dict(spec.rl)) if spec.rl else cfg.rl
    layout, steps = Layout(ROOT, spec.pipeline), spec.steps
    prompts, held_out = splits_of(layout, spec.split)
    cand = CandidateConfig(name=spec.method, algorithm=spec.algorithm or spec.method, seeds=[spec.seed], steps=steps,
                           checkpoints=[steps], lr=cfg.rl.candidates[0].lr, hparams=dict(spec.hparams),
                           warmup_steps=cfg.rl.candidates[0].warmup_steps)
    if "columns" not in prompts and "answer" in prompts:  # the hard split: answers as text, as the reward reads them
        prompts = prompts.assign(answer=prompts["answer"].astype(str))
    rows = TaskRows.from_frame(prompts)   # as the pipeline's RL stage passes them (alignflow/steps/train.py)
    inputs = candidate_inputs(layout, spec.device, cand, rows, teacher=Path(spec.teacher or teacher_dir(spec.pipeline)),
                              ref=Path(spec.ref) if spec.ref else None)
    model, tok = models.load(layout.sft, spec.device)
    extra = {}
    if spec.grad_mask or spec.save_mask:
        import subnetwork
        start = subnetwork.snapshot(model)
        if spec.grad_mask:
            kept = subnetwork.apply_grad_mask(model, subnetwork.load_mask(spec.grad_mask))
            extra["trained_share"] = kept / sum(p.numel() for p in model.parameters())
    # a run's checkpoints and step logs outlive a killed process: the same command resumes the run from its last
    # checkpoint (rl.checkpoint_every) and keeps the logged steps before it (a resumed step's log replaces the old)
    run_dir = resume_dir(spec)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = run_dir / "steps.jsonl"
    logged = {}
    if log_file.exists():
        for line in log_file.read_text().splitlines():
            if line.strip():
                step, metrics = json.loads(line)
                logged[step] = metrics
    started = time.time()
    with log_file.open("a") as sink:
        def on_log(step: int, metrics: dict) -> None:
            logged[step] = metrics
            sink.write(json.dumps([step, metrics], default=float) + "\n")
            sink.flush()
        rl.train_candidate(model, tok, cand, spec.seed, rl_cfg, rows, None, run_dir, on_log=on_log, **inputs)
    trained = time.time()
    logs = [logged[s] for s in sorted(logged)]
    if spec.grad_mask or spec.save_mask:
        extra["sparsity"], packed = subnetwork.changed(start, model)
        if spec.save_mask:
            subnetwork.save_mask(spec.save_mask, packed)
        del start
    quarter = lambda key, part: sum(m[key] for m in part) / max(1, len(part))  # noqa: E731
    first, last = logs[: max(1, steps // 4)], logs[-max(1, steps // 4):]
    result = {"method": spec.method, "seed": spec.seed, "steps": steps, "split": spec.split,
              "reward_first_quarter": quarter("reward", first), "reward_last_quarter": quarter("reward", last),
              "zero_reward_groups_first_quarter": quarter("zero_reward_groups", first),
              "zero_reward_groups_last_quarter": quarter("zero_reward_groups", last),
              "mechanisms": mechanisms_of(logs)} | extra
    result |= scores(model, tok, held_out, per_prompt=spec.per_prompt)
    shutil.rmtree(run_dir)
    return result | {"train_seconds": round(trained - started, 1), "seconds": round(time.time() - started, 1),
                     "step_seconds": round(sum(m["step_seconds"] for m in logs) / max(1, len(logs)), 4)}


def resume_dir(spec: RunSpec) -> Path:
    """Where a run keeps what a restart resumes from (removed once the run's result is written); runs that differ in
    any field (hparams, overrides, masks) get different folders."""
    import hashlib
    digest = hashlib.sha256(repr(dataclasses.astuple(spec)).encode()).hexdigest()[:8]
    return ROOT / "checkpoints" / spec.pipeline / "compare" / "runs" / f"{spec.method}-s{spec.seed}-{spec.steps}-{digest}"


SUMMARY_KEYS = {"standard": ("eval_accuracy", "ood_accuracy", "eval_steps_consistent"),
                "hard": ("hard_accuracy", "zero_reward_groups_first_quarter", "zero_reward_groups_last_quarter")}


def summarise(out: dict) -> list[dict]:
    rows = []
    for method in ["sft", *sorted({r["method"] for r in out["runs"]} - {"sft"})]:
        runs = [r for r in out["runs"] if r["method"] == method]
        row = {"method": method, "n": len(runs)}
        for key in SUMMARY_KEYS[out.get("split", "standard")]:
            if all(key in r for r in runs):
                row[key] = mean_ci([r[key] for r in runs])
        rows.append(row)
    return rows


# each method's mechanism that needs the new-to-old ratio to leave 1 (alignflow/algorithms/, docs/algorithms.md)
RATIO_MECHANISM = {"grpo": "PPO clip 0.8–1.2", "dr_grpo": "PPO clip 0.8–1.2", "empg": "PPO clip 0.8–1.2",
                   "chord": "PPO clip 0.8–1.2", "opsd": "PPO clip 0.8–1.2", "pope": "PPO clip 0.8–1.2",
                   "opd": "PPO clip 0.8–1.2", "exopd": "PPO clip 0.8–1.2", "srppo": "PPO clip 0.8–1.2",
                   "dapo": "clip-higher 0.8–1.28", "dcpo": "dynamic clip bounds from π_old",
                   "opmd": "proximal term (τ/2)(s − s_old)²"}


def mechanism_means(runs: list[dict]) -> dict:
    """Over a method's runs: the mean of each per-run mean the runs logged (bench/compare_methods.py run_one)."""
    keys = {k for r in runs for k, v in r.get("mechanisms", {}).items() if not isinstance(v, list)}
    return {k: sum(r["mechanisms"][k] for r in runs if k in r.get("mechanisms", {}))
            / sum(k in r.get("mechanisms", {}) for r in runs) for k in sorted(keys)}


def mechanism_text(method: str, m: dict) -> str:
    """Which of the method's mechanisms acted, in words, from the logged metrics' means."""
    if not m:
        return "–"
    parts = []
    ratio = RATIO_MECHANISM.get(method)
    if method == "opmd":
        g, a = m.get("opmd/prox_grad", 0.0), m.get("advantage_abs_mean", float("nan"))
        parts.append(f"{ratio}: {'**active**' if g > 0 else 'inactive'}, gradient factor τ·abs(s − s_old) {g:.4f} "
                     f"(the advantage term's abs(A): {a:.3f})")
    elif ratio:
        c = m.get("clip_frac", 0.0)
        parts.append(f"{ratio}: {'**active**' if c > 0 else 'inactive'}, clip fraction {c:.4f}")
    else:
        parts.append("no ratio term (REINFORCE with the shifted baseline, TIS only)")
    if method == "dcpo" and "dcpo/upper_mean" in m:
        parts.append(f"mean upper bound {m['dcpo/upper_mean']:.3f}")
    if method == "dapo" and "dapo/refill_tries" in m:
        parts.append(f"dynamic sampling: {m.get('dapo/kept_groups', 0):.1f} mixed-reward groups kept per step, "
                     f"{m['dapo/refill_tries']:.2f} refills, {m.get('dapo/sampled_prompts', 0):.1f} prompts sampled")
    if method == "srppo" and "kl" in m:
        parts.append(f"KL to SFT {m['kl']:.4f}")
    if method == "chord" and "chord/mu" in m:
        parts.append(f"SFT term, mean μ {m['chord/mu']:.3f}")
    if method == "pope" and "pope/guided_groups" in m:
        parts.append(f"guidance: {m['pope/guided_groups']:.2f} guided groups per step")
    return "; ".join(parts)


def write_hard_docs(out: dict, pipeline: str) -> None:
    """The hard-split table between the methods-hard markers of docs/results.md."""
    rows = summarise(out)
    fmt = lambda mc: f"{mc[0]:.3f} ± {mc[1]:.3f}" if mc[1] == mc[1] else f"{mc[0]:.3f}"  # noqa: E731
    lines = [f"Command: `{out['command']}` ({out['device']}; {out['steps']} RL steps per run from the `{pipeline}` SFT "
             f"model on the hard split's {HARD_SIZES['n_train']} training prompts; unguided greedy accuracy on its "
             f"{HARD_SIZES['n_eval']} held-out prompts; mean ± 95% t-interval over seeds {out['seeds']}; raw: "
             f"`bench/results/methods_{pipeline}_hard.json`).", "",
             "| method | runs | hard held-out accuracy (unguided) | all-zero groups, first quarter | last quarter |",
             "|---|---|---|---|---|"]
    for r in rows:
        cells = [fmt(r[k]) if k in r else "–" for k in SUMMARY_KEYS["hard"]]
        lines.append(f"| {r['method']} | {r['n']} | " + " | ".join(cells) + " |")
    replace_block("methods-hard", "\n".join(lines), "POPE on the hard split")


def replace_block(marker: str, body: str, heading: str) -> None:
    """Put `body` between the `<!-- marker:start/end -->` comments of docs/results.md (a new section if absent)."""
    doc = ROOT / "docs/results.md"
    text = doc.read_text()
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    block = f"{start}\n{body}\n{end}"
    text = text[:text.index(start)] + block + text[text.index(end) + len(end):] if start in text else \
        text + f"\n## {heading}\n\n" + block + "\n"
    doc.write_text(text)


def write_docs(out: dict, pipeline: str, path: Path) -> None:
    """The docs table and plot of one results file; methods_<p>_<tag>.json gets its own `methods-<tag>` block."""
    if out.get("split") == "hard":
        return write_hard_docs(out, pipeline)
    tag = path.stem[len(f"methods_{pipeline}"):].replace("_", "-")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = summarise(out)
    sft = rows[0]["eval_accuracy"][0]
    fmt = lambda mc: f"{mc[0]:.3f} ± {mc[1]:.3f}" if mc[1] == mc[1] else f"{mc[0]:.3f}"  # noqa: E731
    lines = [f"Command: `{out['command']}` ({out['device']}; {out['steps']} RL steps per run from the `{pipeline}` "
             f"SFT model; mean ± half-width of the 95% t-interval over seeds {out['seeds']}; raw: "
             f"`{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}`).", "",
             "| method | runs | greedy eval | vs SFT | greedy OOD | steps consistent (eval) | optimizer steps per "
             "rollout | mechanisms (mean over runs of the per-step logs) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = mechanism_means([x for x in out["runs"] if x["method"] == r["method"]])
        per_rollout = f"{m['optimizer_steps']:.0f}" if "optimizer_steps" in m else "–"
        lines.append(f"| {r['method']} | {r['n']} | {fmt(r['eval_accuracy'])} | {r['eval_accuracy'][0] - sft:+.3f} | "
                     f"{fmt(r['ood_accuracy'])} | {fmt(r['eval_steps_consistent'])} | {per_rollout} | "
                     f"{mechanism_text(r['method'], m)} |")
    replace_block(f"methods{tag}", "\n".join(lines) + f"\n\n![methods](img/{path.stem}.png)",
                  f"Every method, same start ({out['steps']} steps)")
    fig, ax = plt.subplots(figsize=(9, 4))
    names = [r["method"] for r in rows]
    for i, (key, label) in enumerate((("eval_accuracy", "greedy eval"), ("ood_accuracy", "greedy OOD"))):
        ax.bar([x + 0.4 * i for x in range(len(rows))], [r[key][0] for r in rows], width=0.4, label=label,
               yerr=[0 if r[key][1] != r[key][1] else r[key][1] for r in rows], capsize=2)
    ax.axhline(sft, color="grey", lw=0.8, ls="--")
    ax.set_xticks([x + 0.2 for x in range(len(rows))], names, rotation=45, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{out['steps']} RL steps from SFT, up to {len(out['seeds'])} seeds (95% CI where 2 or more)")
    ax.legend()
    fig.tight_layout()
    (ROOT / "docs/img").mkdir(exist_ok=True)
    fig.savefig(ROOT / f"docs/img/{path.stem}.png", dpi=110)


def main() -> int:
    from alignflow.algorithms import ALGORITHMS
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline", default="tiny")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=[name for name, _ in ALGORITHMS.items()])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--report-only", action="store_true", help="rewrite the docs table and plot from the JSON")
    parser.add_argument("--split", default="standard", choices=["standard", "hard"])
    parser.add_argument("--no-report", action="store_true", help="only the JSON (no docs table, plot or summary)")
    args = parser.parse_args()
    suffix = "_hard" if args.split == "hard" else ""
    out_path = Path(args.out or ROOT / f"bench/results/methods_{args.pipeline}{suffix}.json")
    if args.report_only:
        write_docs(json.loads(out_path.read_text()), args.pipeline, out_path)
        return 0
    import torch

    from alignflow.config import load_pipeline
    from alignflow.layout import Layout
    from alignflow.steps.train import train_teacher
    cfg, layout = load_pipeline(args.pipeline, ROOT / "pipelines.yaml"), Layout(ROOT, args.pipeline)
    out = json.loads(out_path.read_text()) if out_path.exists() else {"runs": []}
    device = (f"{torch.cuda.get_device_name(0)}, {args.workers} processes sharing it"
              + (" through MPS" if os.environ.get("CUDA_MPS_PIPE_DIRECTORY") else "") if args.device == "cuda"
              else f"CPU, {args.workers} process{'es' if args.workers > 1 else ''} of one torch thread each")
    out.update(steps=args.steps, seeds=args.seeds, split=args.split, device=device,
               command="python bench/compare_methods.py " + " ".join(sys.argv[1:]))
    torch.set_num_threads(1 if args.workers > 1 else torch.get_num_threads())
    done = {(r["method"], r["seed"]) for r in out["runs"] if r.get("steps") == args.steps}
    # costliest first (extra rollouts or frozen-model passes per step), so the last wave is short; the methods
    # that need the distillation teacher start once it is trained, which the main process does meanwhile
    order = sorted(args.methods, key=lambda m: COST_ORDER.index(m) if m in COST_ORDER else len(COST_ORDER))
    jobs = [(args.pipeline, m, s, args.steps, args.device, args.split) for m in order for s in args.seeds
            if (m, s) not in done]
    jobs.sort(key=lambda j: not resume_dir(RunSpec(*j)).exists())   # runs a killed call left half-done go first
    teacher_ready = (teacher_dir(args.pipeline) / "config.json").exists()
    later = [] if teacher_ready else [j for j in jobs if "teacher" in ALGORITHMS[j[1]].inputs()]
    first = [j for j in jobs if j not in later]
    lock = threading.Lock()

    def finished(result: dict) -> None:
        with lock:
            out["runs"].append(result)
            write_json(out_path, out)
            print(json.dumps({k: v for k, v in result.items() if not k.endswith("steps_consistent")}), flush=True)

    failed = lambda e: print(f"run failed: {e!r}", flush=True)  # noqa: E731
    with mp.get_context("spawn").Pool(args.workers) as pool:
        pending = [pool.apply_async(run_one, (j,), callback=finished, error_callback=failed)
                   for j in first[:args.workers]]
        if later:   # the teacher is not there yet (else `later` is empty)
            started = time.time()
            with tempfile.TemporaryDirectory() as tmp:
                train_teacher(layout, cfg.model_copy(update={"device": args.device}), teacher_dir(args.pipeline),
                              Path(tmp), on_log=lambda s, m: None)
            print(f"teacher trained in {time.time() - started:.0f} s", flush=True)
        if not any(r["method"] == "sft" for r in out["runs"]):
            from alignflow import models
            model, tok = models.load(layout.sft, args.device)
            sft = {"method": "sft", "seed": 0} | scores(model, tok, splits_of(layout, args.split)[1])
            with lock:
                out["runs"].insert(0, sft)
        pending += [pool.apply_async(run_one, (j,), callback=finished, error_callback=failed)
                    for j in later + first[args.workers:]]   # queued behind the first wave
        for p in pending:
            p.wait()
    write_json(out_path, out)
    if args.no_report:   # e.g. on a GPU box without scipy/matplotlib: rewrite the docs later with --report-only
        return 0
    write_docs(out, args.pipeline, out_path)
    for r in summarise(out):
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
