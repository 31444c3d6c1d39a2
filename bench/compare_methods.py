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
table between the `methods` markers of docs/results.md, and docs/img/methods_<p>.png. Partial results are
kept in the JSON as runs finish, and a rerun skips the runs already there.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def teacher_dir(pipeline: str) -> Path:
    from alignflow.layout import Layout
    built = Layout(ROOT, pipeline).teacher
    return built if (built / "config.json").exists() else ROOT / "checkpoints" / pipeline / "compare" / "teacher"


HARD_SIZES = {"n_train": 400, "n_eval": 200}


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


def scores(model, tok, held_out: dict) -> dict:
    from alignflow.data.rows import TaskRows
    from alignflow.evaluation import score
    from alignflow.rewards import RewardSet, accuracy_reward, steps_consistent
    result, reward, steps = {}, RewardSet.of(accuracy_reward), RewardSet.of(steps_consistent)
    for name, rows in held_out.items():
        s = score(model, tok, TaskRows.from_frame(rows), reward, metrics=steps)
        result[f"{name}_accuracy"] = s["value"]
        result[f"{name}_steps_consistent"] = sum(s["per_function"]["steps_consistent"]) / max(1, len(s["texts"]))
    return result


def run_one(job: tuple) -> dict:
    pipeline, method, seed, steps, device, split = job
    import torch

    from alignflow import models
    from alignflow.config import CandidateConfig, load_pipeline
    from alignflow.layout import Layout
    from alignflow.steps.train import candidate_inputs
    from alignflow.train import rl
    torch.set_num_threads(1)
    cfg = load_pipeline(pipeline, ROOT / "pipelines.yaml")
    layout = Layout(ROOT, pipeline)
    prompts, held_out = splits_of(layout, split)
    cand = CandidateConfig(name=method, algorithm=method, seeds=[seed], steps=steps, checkpoints=[steps],
                           lr=cfg.rl.candidates[0].lr, warmup_steps=cfg.rl.candidates[0].warmup_steps)
    from alignflow.data.rows import TaskRows
    inputs = candidate_inputs(layout, device, cand, TaskRows.from_frame(prompts), teacher=teacher_dir(pipeline))
    model, tok = models.load(layout.sft, device)
    logs, started = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        rl.train_candidate(model, tok, cand, seed, cfg.rl, prompts["prompt"].tolist(),
                           prompts["answer"].astype(str).tolist(), Path(tmp), on_log=lambda s, m: logs.append(m),
                           **inputs)
    quarter = lambda key, part: sum(m[key] for m in part) / max(1, len(part))  # noqa: E731
    first, last = logs[: max(1, steps // 4)], logs[-max(1, steps // 4):]
    result = {"method": method, "seed": seed, "steps": steps, "split": split,
              "seconds": round(time.time() - started, 1),
              "reward_first_quarter": quarter("reward", first), "reward_last_quarter": quarter("reward", last),
              "zero_reward_groups_first_quarter": quarter("zero_reward_groups", first),
              "zero_reward_groups_last_quarter": quarter("zero_reward_groups", last)}
    return result | scores(model, tok, held_out)


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval."""
    from scipy import stats
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)


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


def write_docs(out: dict, pipeline: str) -> None:
    if out.get("split") == "hard":
        return write_hard_docs(out, pipeline)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = summarise(out)
    sft = rows[0]["eval_accuracy"][0]
    fmt = lambda mc: f"{mc[0]:.3f} ± {mc[1]:.3f}" if mc[1] == mc[1] else f"{mc[0]:.3f}"  # noqa: E731
    lines = [f"Command: `{out['command']}` ({out['device']}; {out['steps']} RL steps per run from the `{pipeline}` "
             f"SFT model; mean ± half-width of the 95% t-interval over seeds {out['seeds']}; raw: "
             f"`bench/results/methods_{pipeline}.json`).", "",
             "| method | runs | greedy eval | vs SFT | greedy OOD | steps consistent (eval) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['n']} | {fmt(r['eval_accuracy'])} | {r['eval_accuracy'][0] - sft:+.3f} | "
                     f"{fmt(r['ood_accuracy'])} | {fmt(r['eval_steps_consistent'])} |")
    replace_block("methods", "\n".join(lines) + f"\n\n![methods](img/methods_{pipeline}.png)", "Every method, same start")
    fig, ax = plt.subplots(figsize=(9, 4))
    names = [r["method"] for r in rows]
    for i, (key, label) in enumerate((("eval_accuracy", "greedy eval"), ("ood_accuracy", "greedy OOD"))):
        ax.bar([x + 0.4 * i for x in range(len(rows))], [r[key][0] for r in rows], width=0.4, label=label,
               yerr=[0 if r[key][1] != r[key][1] else r[key][1] for r in rows], capsize=2)
    ax.axhline(sft, color="grey", lw=0.8, ls="--")
    ax.set_xticks([x + 0.2 for x in range(len(rows))], names, rotation=45, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{out['steps']} RL steps from SFT, {len(out['seeds'])} seeds (95% CI)")
    ax.legend()
    fig.tight_layout()
    (ROOT / "docs/img").mkdir(exist_ok=True)
    fig.savefig(ROOT / f"docs/img/methods_{pipeline}.png", dpi=110)


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
    args = parser.parse_args()
    suffix = "_hard" if args.split == "hard" else ""
    out_path = Path(args.out or ROOT / f"bench/results/methods_{args.pipeline}{suffix}.json")
    if args.report_only:
        write_docs(json.loads(out_path.read_text()), args.pipeline)
        return 0
    import torch

    from alignflow.config import load_pipeline
    from alignflow.layout import Layout
    from alignflow.steps.train import train_teacher
    cfg, layout = load_pipeline(args.pipeline, ROOT / "pipelines.yaml"), Layout(ROOT, args.pipeline)
    out = json.loads(out_path.read_text()) if out_path.exists() else {"runs": []}
    out.update(steps=args.steps, seeds=args.seeds, split=args.split, device=torch.cuda.get_device_name(0) if args.device == "cuda"
               else f"{torch.get_num_threads()}-thread CPU", command="python bench/compare_methods.py " + " ".join(sys.argv[1:]))
    if not any(r["method"] == "sft" for r in out["runs"]):
        from alignflow import models
        model, tok = models.load(layout.sft, args.device)
        out["runs"].append({"method": "sft", "seed": 0} | scores(model, tok, splits_of(layout, args.split)[1]))
    needs_teacher = any("teacher" in ALGORITHMS[m].inputs() for m in args.methods)
    if needs_teacher and not (teacher_dir(args.pipeline) / "config.json").exists():
        with tempfile.TemporaryDirectory() as tmp:
            train_teacher(layout, cfg.model_copy(update={"device": args.device}), teacher_dir(args.pipeline),
                          Path(tmp), on_log=lambda s, m: None)
    done = {(r["method"], r["seed"]) for r in out["runs"] if r.get("steps") == args.steps}
    jobs = [(args.pipeline, m, s, args.steps, args.device, args.split) for s in args.seeds for m in args.methods
            if (m, s) not in done]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for result in pool.imap_unordered(run_one, jobs):
            out["runs"].append(result)
            out_path.write_text(json.dumps(out, indent=2))
            print(json.dumps({k: v for k, v in result.items() if not k.endswith("steps_consistent")}), flush=True)
    out_path.write_text(json.dumps(out, indent=2))
    write_docs(out, args.pipeline)
    for r in summarise(out):
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
