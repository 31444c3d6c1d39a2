"""The seed papers' claims (issue 19), tested from one SFT model per pipeline with several seeds and 95% intervals.

    python bench/claims.py --pipeline gpu --device cuda --workers 3 --steps 40 --deadline-s 300   # bench/claims_device.sh
    OMP_NUM_THREADS=1 python bench/claims.py --pipeline tiny --steps 100 --workers 2 \\
        --methods grpo grpo_masked pope grpo_hard srppo srppo_verifier opd exopd exopd_15 exopd_rc opsd
    python bench/claims.py --report-only        # claims.json, the docs table and plots from every runs file

Every run is one run of the one RL loop (alignflow/train/rl.py) through compare_methods.run_spec, from the
pipeline's SFT model, with the pipeline's RL settings and its first candidate's learning rate; each method keeps its
paper's defaults (docs/algorithms.md). The claims and their runs (VARIANTS):

a. SRPPO (arXiv:2510.21090) beats SFT out of distribution from demonstrations alone: `srppo` (implicit reward,
   verifier off as published) and `srppo_verifier` (verifier reward added, hparam verifier_weight 1) vs SFT and GRPO.
b. ExOPD (arXiv:2602.12125) beats OPD with a stronger teacher (the `teacher` stage's model): `exopd` (lambda 1.25),
   `exopd_15` (1.5) and `exopd_rc` (1.25 with the reward-corrected reference: the teacher's own model before its
   post-training, here the base model, since our teacher is SFT run to the end, not RL) vs `opd`.
c. OPSD (arXiv:2601.18734) with the task's worked solution in the teacher copy's prompt (alignflow.algorithms.core
   PRIVILEGED_TEMPLATE, the generator's worked steps) vs SFT and GRPO; whether the model can read that context is
   measured: the SFT model's greedy accuracy with the solution in its prompt (`sft.privileged_eval_accuracy`).
d. POPE (arXiv:2601.18779) vs GRPO on the hard split (`pope`, `grpo_hard`; compare_methods --split hard).
e. RL updates a small subnetwork (arXiv:2505.11711): every standard-split run's changed set (bf16 elements that
   differ from SFT, per matrix; bench/subnetwork.py), its Jaccard overlap across seeds and methods against chance,
   and `grpo_masked`: GRPO seed s trained with its gradients masked to the changed set of `grpo` seed s.

Verdicts (bench/stats.py): the 95% t-interval over seeds of the difference (one-sample against the deterministic
SFT / teacher figure, Welch between two methods) decides; a paired bootstrap over the held-out prompts is reported
beside it. Runs are kept in --out as they finish (a rerun skips those there); --deadline-s stops starting runs that
would not finish in time (their claims then say which runs are missing).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import textwrap
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
import compare_methods as cm  # noqa: E402
import stats  # noqa: E402

# name -> how it runs: preset, hparams, split, reference ("base": the teacher's pre-post-training model), mask source
VARIANTS = {
    "grpo": {"algorithm": "grpo"},
    "srppo": {"algorithm": "srppo"},
    "srppo_verifier": {"algorithm": "srppo", "hparams": {"verifier_weight": 1.0}},
    "opd": {"algorithm": "opd"},
    "exopd": {"algorithm": "exopd"},
    "exopd_15": {"algorithm": "exopd", "hparams": {"reward_scale": 1.5}},
    "exopd_rc": {"algorithm": "exopd", "ref": "base"},
    "opsd": {"algorithm": "opsd"},
    "opsd_hybrid": {"algorithm": "opsd", "hparams": {"task_weight": 1.0, "distill_coef": 0.1}},
    "grpo_masked": {"algorithm": "grpo", "mask_from": "grpo"},
    "pope": {"algorithm": "pope", "split": "hard"},
    "grpo_hard": {"algorithm": "grpo", "split": "hard"},
}
# the order runs start in: the issue's GPU claims first (SRPPO, ExOPD, OPSD and their baselines), then the rest
PRIORITY = ["srppo", "grpo", "opsd", "opd", "exopd", "exopd_15", "exopd_rc", "srppo_verifier", "grpo_masked",
            "opsd_hybrid", "pope", "grpo_hard"]
PAPER_MAX_SHARE = 0.30   # arXiv:2505.11711: RL updates 5-30% of the parameters (70-95% sparsity)


def needs_teacher(name: str) -> bool:
    from alignflow.algorithms import ALGORITHMS
    v = VARIANTS[name]
    return "teacher" in ALGORITHMS[v["algorithm"]].inputs(v.get("hparams", {}))


def spec_of(name: str, seed: int, args, mask_dir: Path) -> cm.RunSpec:
    from alignflow.layout import Layout
    v = VARIANTS[name]
    split = v.get("split", "standard")
    return cm.RunSpec(
        pipeline=args.pipeline, method=name, seed=seed, steps=args.steps, device=args.device, split=split,
        algorithm=v["algorithm"], hparams=tuple(sorted(v.get("hparams", {}).items())),
        ref=str(Layout(ROOT, args.pipeline).base) if v.get("ref") == "base" else None,
        rl=tuple(sorted(args.rl_overrides.items())),
        grad_mask=str(mask_dir / f"{v['mask_from']}-s{seed}.npy") if "mask_from" in v else None,
        save_mask=str(mask_dir / f"{name}-s{seed}.npy") if split == "standard" else None, per_prompt=True)


def scores_of(pipeline: str, model_dir: Path, device: str, hard: bool, privileged: bool) -> dict:
    """Greedy figures of a fixed model (SFT, teacher): eval and ood (and the hard split), per prompt; with
    `privileged`, also eval with the worked solution in the prompt as OPSD's teacher copy sees it."""
    from alignflow import models
    from alignflow.algorithms.core import PRIVILEGED_TEMPLATE
    from alignflow.data.rows import TaskRows
    from alignflow.evaluation import score
    from alignflow.layout import Layout
    from alignflow.rewards import RewardSet, accuracy_reward
    from alignflow.steps.train import worked_solution
    layout = Layout(ROOT, pipeline)
    model, tok = models.load(model_dir, device)
    held_out = cm.splits_of(layout, "standard")[1]
    if hard:
        held_out |= cm.splits_of(layout, "hard")[1]
    out = cm.scores(model, tok, held_out, per_prompt=True)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    if privileged:
        rows = held_out["eval"]
        shown = rows.drop(columns=["messages"], errors="ignore").assign(prompt=[
            PRIVILEGED_TEMPLATE.format(prompt=p, solution=worked_solution(p, None)) for p in rows["prompt"]])
        out["privileged_eval_accuracy"] = score(model, tok, TaskRows.from_frame(shown),
                                                RewardSet.of(accuracy_reward))["value"]
    return out


def teacher_job(pipeline: str, device: str) -> dict:
    """Train the distillation teacher where compare_methods keeps it, unless there (the `teacher` stage's
    function, alignflow.steps.train.train_teacher), and score it like SFT."""
    import torch

    from alignflow.config import load_pipeline
    from alignflow.layout import Layout
    from alignflow.steps.train import train_teacher
    torch.set_num_threads(1)
    started, out_dir = time.time(), cm.teacher_dir(pipeline)
    if not (out_dir / "config.json").exists():
        cfg = load_pipeline(pipeline, ROOT / "pipelines.yaml")
        with tempfile.TemporaryDirectory() as tmp:
            train_teacher(Layout(ROOT, pipeline), cfg.model_copy(update={"device": device}), out_dir, Path(tmp),
                          on_log=lambda s, m: None)
    return scores_of(pipeline, out_dir, device, False, False) | {"seconds": time.time() - started}


def record_overlaps(out: dict, result: dict, mask_dir: Path) -> None:
    """Jaccard of the new run's changed set with every earlier run's, and the chance level for their densities."""
    import subnetwork
    if "sparsity" not in result:
        return
    mine = subnetwork.load_mask(mask_dir / f"{result['method']}-s{result['seed']}.npy")
    for other in out["runs"]:
        path = mask_dir / f"{other['method']}-s{other['seed']}.npy"
        if other is result or "sparsity" not in other or not path.exists():
            continue
        p, q = result["sparsity"]["changed_share"], other["sparsity"]["changed_share"]
        out["overlaps"].append({"a": [result["method"], result["seed"]], "b": [other["method"], other["seed"]],
                                "jaccard": subnetwork.jaccard(mine, subnetwork.load_mask(path)),
                                "chance": subnetwork.chance_jaccard(p, q)})


def run_all(args) -> dict:
    import torch

    from alignflow.config import load_pipeline
    from alignflow.layout import Layout
    started = time.time()
    cfg, layout = load_pipeline(args.pipeline, ROOT / "pipelines.yaml"), Layout(ROOT, args.pipeline)
    out_path = Path(args.out)
    out = json.loads(out_path.read_text()) if out_path.exists() else {"runs": [], "overlaps": [], "skipped": []}
    mask_dir = Path(args.work or ROOT / "checkpoints" / args.pipeline / "claims")
    rl_cfg = cfg.rl.model_copy(update=args.rl_overrides)
    device = (f"{torch.cuda.get_device_name(0)}, {args.workers} processes sharing it" if args.device == "cuda"
              else f"CPU, {args.workers} process{'es' if args.workers > 1 else ''} of one torch thread each")
    out.update(pipeline=args.pipeline, steps=args.steps, seeds=args.seeds, device=device, skipped=[],
               command="python bench/claims.py " + " ".join(sys.argv[1:]),
               rl={"prompts_per_step": rl_cfg.prompts_per_step, "group_size": rl_cfg.group_size,
                   "temperature": rl_cfg.temperature, "max_new_tokens": rl_cfg.max_new_tokens,
                   "mini_batches": rl_cfg.mini_batches, "lr": cfg.rl.candidates[0].lr,
                   "warmup_steps": cfg.rl.candidates[0].warmup_steps, "engine": rl_cfg.engine})
    done = {(r["method"], r["seed"]) for r in out["runs"] if r.get("steps") == args.steps}
    order = sorted(args.methods, key=PRIORITY.index)
    pending = [spec_of(m, s, args, mask_dir) for m in order for s in args.seeds if (m, s) not in done]
    durations: dict[str, list[float]] = {}

    def ready(spec) -> bool:
        return ((teacher["ready"] or not needs_teacher(spec.method))
                and (spec.grad_mask is None or Path(spec.grad_mask).exists()))

    def fits(spec) -> bool:
        if args.deadline_s is None:
            return True
        seen = durations.get(spec.method) or [d for ds in durations.values() for d in ds]
        estimate = max(seen) if seen else args.prior_run_s
        return time.time() - started + estimate <= args.deadline_s

    teacher = {"ready": (cm.teacher_dir(args.pipeline) / "config.json").exists(), "failed": None, "future": None}

    def write() -> None:
        cm.write_json(out_path, out)

    running: dict = {}
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        def submit() -> None:
            for spec in list(pending):
                if len(running) >= args.workers:
                    return
                if not ready(spec):
                    continue
                pending.remove(spec)
                if not fits(spec):
                    out["skipped"].append({"method": spec.method, "seed": spec.seed, "why": "deadline"})
                    continue
                running[pool.submit(cm.run_spec, spec)] = (spec, time.time())

        def collect(timeout: float | None) -> None:
            finished, _ = wait(list(running), timeout=timeout, return_when=FIRST_COMPLETED)
            for fut in finished:
                spec, t0 = running.pop(fut)
                durations.setdefault(spec.method, []).append(time.time() - t0)
                try:
                    result = fut.result()
                except Exception as err:   # a failed run is reported and the rest go on
                    print(f"run failed: {spec.method} s{spec.seed}: {err!r}", flush=True)
                    out["skipped"].append({"method": spec.method, "seed": spec.seed, "why": repr(err)[:300]})
                    continue
                out["runs"].append(result)
                record_overlaps(out, result, mask_dir)
                write()
                print(json.dumps({k: v for k, v in result.items() if k in (
                    "method", "seed", "eval_accuracy", "ood_accuracy", "hard_accuracy", "seconds", "step_seconds")}
                    | {"changed_share": result.get("sparsity", {}).get("changed_share"),
                       "elapsed": round(time.time() - started)}), flush=True)

        submit()
        wants_teacher = any(needs_teacher(m) for m in args.methods) and "teacher" not in out
        # the distillation teacher (the `teacher` stage's function) and its figures, in a process of its own
        helper = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) if wants_teacher else None
        if helper:
            teacher["future"] = helper.submit(teacher_job, args.pipeline, args.device)
        if "sft" not in out:   # SFT's figures (also with the worked solution in the prompt) while the runs train
            hard = any(VARIANTS[m].get("split") == "hard" for m in args.methods)
            out["sft"] = scores_of(args.pipeline, layout.sft, args.device, hard, privileged=True)
            write()
            print(f"sft: eval {out['sft']['eval_accuracy']:.3f} ood {out['sft']['ood_accuracy']:.3f}; with the "
                  f"worked solution in the prompt {out['sft']['privileged_eval_accuracy']:.3f}", flush=True)
        while pending or running:
            fut = teacher["future"]
            if fut is not None and fut.done():
                teacher["future"] = None
                try:
                    out["teacher"] = fut.result()
                    teacher["ready"] = True
                    write()
                    print(f"teacher: eval {out['teacher']['eval_accuracy']:.3f} ood "
                          f"{out['teacher']['ood_accuracy']:.3f} ({out['teacher']['seconds']:.0f} s)", flush=True)
                except Exception as err:   # the other claims go on without the distillation runs
                    print(f"teacher failed: {err!r}", flush=True)
                    for spec in [s for s in pending if needs_teacher(s.method)]:
                        pending.remove(spec)
                        out["skipped"].append({"method": spec.method, "seed": spec.seed, "why": f"teacher: {err!r}"[:300]})
            submit()
            if running:
                collect(timeout=2.0)
            elif teacher["future"] is not None:   # waiting for the teacher
                wait([teacher["future"]], timeout=2.0)
            else:
                # nothing can start (a mask that was never written): say so and stop
                out["skipped"] += [{"method": s.method, "seed": s.seed, "why": "input missing"} for s in pending]
                break
        if helper:
            helper.shutdown()
    out["seconds"] = round(time.time() - started, 1)
    write()
    return out


# ---------------------------------------------------------------- analysis: figures, intervals, verdicts
def _runs(out: dict, method: str) -> list[dict]:
    return sorted((r for r in out["runs"] if r["method"] == method), key=lambda r: r["seed"])


def compare(out: dict, a: str, b: str, metric: str, direction: str = "greater",
            margin: float = stats.PRACTICAL_MARGIN) -> dict:
    """Method a against method b (or the fixed `sft` / `teacher` figures) on one accuracy: the difference, its
    t-interval over seeds, a paired bootstrap over the prompts, and the verdict."""
    ra = _runs(out, a)
    fixed = b in ("sft", "teacher")
    rb = [out[b]] if fixed and b in out else ([] if fixed else _runs(out, b))
    row = {"a": a, "b": b, "metric": metric, "direction": direction, "margin": margin,
           "seeds_a": [r["seed"] for r in ra], "seeds_b": None if fixed else [r["seed"] for r in rb]}
    if not ra or not rb or any(metric not in r for r in ra + rb):
        return row | {"verdict": "not run"}
    va, vb = [r[metric] for r in ra], [r[metric] for r in rb]
    t = stats.diff_vs_constant(va, vb[0]) if fixed else stats.welch_diff(va, vb)
    row |= {"a_mean": sum(va) / len(va), "a_ci": stats.mean_ci(va)[1], "a_values": va, "b_mean": sum(vb) / len(vb),
            "b_ci": None if fixed else stats.mean_ci(vb)[1], "diff": t["diff"], "t_interval": [t["lo"], t["hi"]],
            "t_df": t["df"], "verdict": stats.verdict(t["lo"], t["hi"], direction, margin)}
    key = metric.replace("_accuracy", "_correct")
    if all(key in r for r in ra + rb):
        rows = lambda runs: [[int(c) for c in r[key]] for r in runs]  # noqa: E731
        boot = stats.paired_bootstrap(rows(ra), rows(rb))
        row |= {"bootstrap_interval": [boot["lo"], boot["hi"]], "bootstrap_prompts": boot["n_prompts"]}
    return row


def threshold_test(values: list[float], name: str, margin: float = 0.0) -> dict:
    """A figure that the paper says is positive (e.g. 0.30 - changed share): its t-interval over the values."""
    if not values:
        return {"test": name, "verdict": "not run"}
    t = stats.diff_vs_constant(values, 0.0)
    return {"test": name, "n": len(values), "mean": t["diff"], "t_interval": [t["lo"], t["hi"]], "margin": margin,
            "verdict": stats.verdict(t["lo"], t["hi"], "greater", margin)}


def sparsity_summary(out: dict) -> dict:
    """Per method: mean changed share (bf16, fp32, |delta| > 1e-5) with its interval, and the per-matrix shares
    averaged over seeds; overlaps: Jaccard within a method across seeds and across methods, against chance."""
    methods = sorted({r["method"] for r in out["runs"] if "sparsity" in r})
    per_method = {}
    for m in methods:
        runs = [r for r in _runs(out, m) if "sparsity" in r]
        figures = {k: stats.mean_ci([r["sparsity"][k] for r in runs]) for k in
                   ("changed_share", "fp32_changed_share", "abs_gt_1e-5_share")}
        matrices = runs[0]["sparsity"]["per_matrix"]
        per_matrix = {name: sum(r["sparsity"]["per_matrix"][name] for r in runs) / len(runs) for name in matrices}
        per_method[m] = {"seeds": [r["seed"] for r in runs], **{k: {"mean": v[0], "ci": v[1]} for k, v in figures.items()},
                         "per_matrix": per_matrix, "parameters": runs[0]["sparsity"]["parameters"]}
    within, across = {}, {}
    for o in out.get("overlaps", []):
        (ma, _), (mb, _) = o["a"], o["b"]
        bucket = within.setdefault(ma, []) if ma == mb else across.setdefault(" vs ".join(sorted((ma, mb))), [])
        bucket.append(o)
    summary = lambda os_: {"pairs": len(os_), "jaccard": sum(o["jaccard"] for o in os_) / len(os_),  # noqa: E731
                           "chance": sum(o["chance"] for o in os_) / len(os_)}
    return {"per_method": per_method, "within_method": {k: summary(v) for k, v in within.items()},
            "across_methods": {k: summary(v) for k, v in across.items()}}


def claim(cid: str, title: str, paper: str, tests: list[dict], differs: list[str], figures: dict | None = None,
          verdict: str | None = None) -> dict:
    head = tests[0]
    return {"claim": cid, "title": title, "paper": paper, "verdict": verdict or head["verdict"], "headline": head,
            "tests": tests, "figures": figures or {}, "differs_from_paper": differs}


def analyse(out: dict) -> list[dict]:
    """The five claims of issue 19 for one pipeline's runs."""
    steps, p = out["steps"], out["pipeline"]
    common = [f"{steps} RL steps per run of {out['rl']['prompts_per_step']} prompts x {out['rl']['group_size']} "
              f"(the papers train for hundreds to thousands of steps on real models)",
              f"a {out['sft']['parameters'] / 1e6:.1f} M-parameter Qwen2-shape model trained from scratch on generated "
              "addition (the papers: 1.5-8 B pre-trained models on maths/reasoning data)",
              f"learning rate {out['rl']['lr']} for every method (the pipeline's), each method's own constants otherwise",
              "optimizer steps per rollout: " + (f"{out['rl']['mini_batches']} for every method (rl.mini_batches)"
                                                  if out["rl"].get("mini_batches") else
                                                  "each preset's own (docs/algorithms.md: 1 for GRPO and OPSD, 4 for "
                                                  "SRPPO and OPD/ExOPD)")]
    srppo = claim("srppo", "SRPPO from demonstrations alone generalises better than SFT (OOD)", "arXiv:2510.21090", [
        compare(out, "srppo", "sft", "ood_accuracy"), compare(out, "srppo", "sft", "eval_accuracy"),
        compare(out, "srppo", "grpo", "ood_accuracy"), compare(out, "srppo", "grpo", "eval_accuracy"),
        compare(out, "srppo_verifier", "sft", "ood_accuracy"), compare(out, "srppo_verifier", "sft", "eval_accuracy")],
        common + ["group baseline instead of PPO's value model (GAE)", "KL coefficient 0.04 (ours)",
                  "`srppo_verifier` adds the verifier reward (not in the paper; the comparison with labels)"])
    teacher = out.get("teacher", {})
    exopd = claim("exopd", "ExOPD (reward extrapolation, lambda > 1) beats OPD with a stronger teacher",
                  "arXiv:2602.12125", [
        compare(out, "exopd", "opd", "eval_accuracy"), compare(out, "exopd", "opd", "ood_accuracy"),
        compare(out, "exopd_15", "opd", "eval_accuracy"), compare(out, "exopd_15", "opd", "ood_accuracy"),
        compare(out, "exopd_rc", "opd", "eval_accuracy"), compare(out, "exopd_rc", "opd", "ood_accuracy"),
        compare(out, "exopd", "teacher", "eval_accuracy"), compare(out, "opd", "sft", "eval_accuracy")],
        common + ["teacher: the same architecture SFT-trained to the end from the same base (the paper: a larger "
                  "RL-trained model); so the reward-corrected reference (`exopd_rc`) is the teacher's model before "
                  "its post-training, the base model, where the paper uses the teacher's pre-RL checkpoint"],
        figures={"teacher_eval_accuracy": teacher.get("eval_accuracy"), "teacher_ood_accuracy": teacher.get("ood_accuracy"),
                 "sft_eval_accuracy": out["sft"]["eval_accuracy"], "sft_ood_accuracy": out["sft"]["ood_accuracy"],
                 "teacher_stronger": (teacher["eval_accuracy"] > out["sft"]["eval_accuracy"]) if teacher else None})
    opsd = claim("opsd", "OPSD with privileged context (the worked solution) improves over SFT and matches GRPO",
                 "arXiv:2601.18734", [
        compare(out, "opsd", "sft", "eval_accuracy"), compare(out, "opsd", "grpo", "eval_accuracy", "not_worse"),
        compare(out, "opsd", "sft", "ood_accuracy"), compare(out, "opsd_hybrid", "sft", "eval_accuracy"),
        compare(out, "opsd_hybrid", "grpo", "eval_accuracy", "not_worse")],
        common + ["the privileged context is the generator's worked steps (ending in the answer) in the teacher "
                  "copy's prompt, a prompt form the model never saw in training (the paper: a reasoning model that "
                  "reads a reference solution)", "sampled-token estimate of the reverse KL (no full-vocabulary "
                  "divergence)"],
        figures={"sft_eval_accuracy": out["sft"]["eval_accuracy"],
                 "sft_eval_accuracy_with_solution_in_prompt": out["sft"].get("privileged_eval_accuracy"),
                 "context_readable": (out["sft"].get("privileged_eval_accuracy", 0) > out["sft"]["eval_accuracy"])})
    pope = claim("pope", "POPE beats GRPO on hard problems (unguided accuracy)", "arXiv:2601.18779", [
        compare(out, "pope", "grpo_hard", "hard_accuracy"), compare(out, "pope", "sft", "hard_accuracy"),
        compare(out, "grpo_hard", "sft", "hard_accuracy")],
        common + [f"hard split: 3-digit + 3-digit sums ({cm.HARD_SIZES['n_train']} training prompts, "
                  f"{cm.HARD_SIZES['n_eval']} held out); prefix = the first k worked steps, shortest that works"],
        figures={"sft_hard_accuracy": out["sft"].get("hard_accuracy")})
    sp = sparsity_summary(out)
    shares = {m: [PAPER_MAX_SHARE - r["sparsity"]["changed_share"] for r in _runs(out, m) if "sparsity" in r]
              for m in sp["per_method"]}
    within = [o["jaccard"] - o["chance"] for o in out.get("overlaps", []) if o["a"][0] == o["b"][0] == "grpo"]
    sub_tests = [threshold_test(shares.get("grpo", []), "grpo: 0.30 - changed share > 0 (an update of at most the "
                                "paper's 30%)"),
                 threshold_test(within, "grpo: Jaccard across seeds - chance level > 0"),
                 compare(out, "grpo_masked", "grpo", "eval_accuracy", "not_worse"),
                 compare(out, "grpo_masked", "sft", "eval_accuracy")]
    sub_tests += [threshold_test(v, f"{m}: 0.30 - changed share > 0") for m, v in shares.items() if m != "grpo"]
    parts = [t["verdict"] for t in sub_tests[:3]]
    combined = ("holds" if all(v == "holds" for v in parts) else "does not hold" if "does not hold" in parts
                else "inconclusive")
    subnet = claim("subnetwork", "RL updates a small subnetwork, consistent across seeds, and training only it "
                   "recovers the accuracy", "arXiv:2505.11711", sub_tests,
                   common + ["changed = the bf16 value differs from SFT's (the paper: bf16 with tolerance 1e-5); "
                             "fp32 master weights, AdamW without weight decay", "the subnetwork run reuses the full "
                             "run's seed (same prompt stream)", "Jaccard pairs share runs, so the interval over "
                             "pairs is optimistic"],
                   figures=sp, verdict=combined)
    subnet["headline"] = sub_tests[2]
    meta = {"pipeline": p, "steps": steps, "seeds": out["seeds"], "device": out["device"],
            "model_parameters": out["sft"]["parameters"], "rl": out["rl"],
            "runs": {m: len(_runs(out, m)) for m in sorted({r["method"] for r in out["runs"]})},
            "skipped": out.get("skipped", [])}
    return [c | meta for c in (srppo, exopd, opsd, pope, subnet)]


def merge_claims(path: Path, pipeline: str, claims: list[dict]) -> dict:
    """claims.json keeps every pipeline's claims; this pipeline's are replaced."""
    merged = json.loads(path.read_text()) if path.exists() else {"claims": []}
    merged["claims"] = [c for c in merged["claims"] if c["pipeline"] != pipeline] + claims
    merged["note"] = ("verdict from the 95% t-interval over seeds of the difference (holds: excludes 0 in the paper's "
                      f"direction; does not hold: excludes it the other way or its upper bound is below "
                      f"{stats.PRACTICAL_MARGIN}; not_worse tests: lower bound above -margin); bootstrap over prompts "
                      "beside it; `bench/claims.py`")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2))
    return merged


# ---------------------------------------------------------------- docs
def _interval(row: dict, key: str) -> str:
    lo, hi = row.get(key, [float("nan")] * 2)
    return f"[{lo:+.3f}, {hi:+.3f}]" if lo == lo else "–"


def write_docs(merged: dict) -> None:
    lines = ["Raw runs: `bench/results/claims_<pipeline>_runs.json`; claims, figures and the settings that differ from "
             "each paper: `bench/results/claims.json` (`python bench/claims.py --report-only`). Difference = the "
             "paper's method minus the baseline; 95% t-interval over seeds (one-sample against the fixed SFT / teacher "
             "figure, Welch between methods), paired bootstrap over the held-out prompts beside it.", "",
             "| claim | pipeline (model, steps, device) | test | a | b | difference | t-interval (seeds) | bootstrap "
             "(prompts) | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for c in merged["claims"]:
        where = f"`{c['pipeline']}` ({c['model_parameters'] / 1e6:.1f} M, {c['steps']} steps, {c['device']})"
        for i, t in enumerate(c["tests"]):
            name = f"**{c['claim']}: {c['verdict']}**" if i == 0 else ""
            if t["verdict"] == "not run":   # only a headline that was not run gets a row (the JSON lists all)
                if i == 0:
                    lines.append(f"| {name} | {where} | {t.get('metric', t.get('test'))} | {t.get('a', '–')} | "
                                 f"{t.get('b', '–')} | – | – | – | not run |")
                continue
            if "a" not in t:
                lines.append(f"| {name} | {where if i == 0 else ''} | {t['test']} | – | – | "
                             f"{t.get('mean', float('nan')):+.3f} | {_interval(t, 't_interval')} | – | {t['verdict']} |")
                continue
            a = f"{t['a']} {t['a_mean']:.3f} (n={len(t['seeds_a'])})"
            lines.append(f"| {name} | {where if i == 0 else ''} | {t['metric']} ({t['direction']}) | {a} | {t['b']} "
                         f"{t['b_mean']:.3f} | {t['diff']:+.3f} | {_interval(t, 't_interval')} | "
                         f"{_interval(t, 'bootstrap_interval')} | {t['verdict']} |")
    lines.append("")
    lines += [f"![{c}](img/claims_{c}.png)" for c in sorted({c["claim"] for c in merged["claims"]})]
    cm.replace_block("claims", "\n".join(lines), "The seed papers' claims (issue 19)")
    plot(merged)


def plot(merged: dict) -> None:
    """One figure per claim: each pipeline's methods (mean and 95% t-interval over seeds) beside SFT."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    (ROOT / "docs/img").mkdir(exist_ok=True)
    by_claim: dict[str, list[dict]] = {}
    for c in merged["claims"]:
        by_claim.setdefault(c["claim"], []).append(c)
    for cid, cs in by_claim.items():
        fig, axes = plt.subplots(1, len(cs), figsize=(5.5 * len(cs), 3.8), squeeze=False)
        for ax, c in zip(axes[0], cs):
            if cid == "subnetwork":
                pm = c["figures"]["per_method"]
                names = list(pm)
                ax.bar(names, [pm[m]["changed_share"]["mean"] for m in names],
                       yerr=[0 if pm[m]["changed_share"]["ci"] != pm[m]["changed_share"]["ci"] else
                             pm[m]["changed_share"]["ci"] for m in names], capsize=2)
                ax.axhline(PAPER_MAX_SHARE, color="grey", ls="--", lw=0.8, label="paper's largest share (0.30)")
                ax.set_ylabel("share of parameters changed (bf16)")
                ax.legend(fontsize=7)
            else:
                bars = {}
                for t in c["tests"]:
                    if t.get("verdict") != "not run" and "a_mean" in t:
                        bars[(t["a"], t["metric"])] = (t["a_mean"], t["a_ci"])
                        if t["b"] not in ("sft", "teacher"):
                            bars[(t["b"], t["metric"])] = (t["b_mean"], t["b_ci"])
                        else:
                            bars[(t["b"], t["metric"])] = (t["b_mean"], 0.0)
                keys = sorted(bars, key=lambda k: (k[1], k[0]))
                ax.bar(range(len(keys)), [bars[k][0] for k in keys],
                       yerr=[0 if bars[k][1] != bars[k][1] or bars[k][1] is None else bars[k][1] for k in keys],
                       capsize=2, color=["C0" if "eval" in k[1] else "C1" if "ood" in k[1] else "C2" for k in keys])
                ax.set_xticks(range(len(keys)), [f"{k[0]}\n{k[1].replace('_accuracy', '')}" for k in keys],
                              rotation=60, ha="right", fontsize=7)
                ax.set_ylabel("greedy accuracy")
                ax.set_ylim(0, 1)
            ax.set_title(f"{c['pipeline']}: {c['verdict']} ({len(c['seeds'])} seeds, {c['steps']} steps)", fontsize=9)
        fig.suptitle("\n".join(textwrap.wrap(cs[0]["title"], 60 * len(cs))), fontsize=9)
        fig.tight_layout()
        fig.savefig(ROOT / f"docs/img/claims_{cid}.png", dpi=100)
        plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="tiny")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=[m for m in PRIORITY if m != "opsd_hybrid"],
                        choices=list(VARIANTS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--prompts-per-step", type=int, default=None, help="override rl.prompts_per_step")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="start no run that would end after this many seconds from the start (longest run of the "
                             "same method so far, else of any, else --prior-run-s)")
    parser.add_argument("--prior-run-s", type=float, default=60.0)
    parser.add_argument("--out", default=None, help="runs JSON (default bench/results/claims_<pipeline>_runs.json)")
    parser.add_argument("--claims-out", default=str(ROOT / "bench/results/claims.json"))
    parser.add_argument("--work", default=None, help="changed-set files (default checkpoints/<pipeline>/claims)")
    parser.add_argument("--no-report", action="store_true", help="claims JSON only (no docs table or plots)")
    parser.add_argument("--report-only", action="store_true",
                        help="claims.json, the docs table and plots from every bench/results/claims_*_runs.json "
                             "(or --out)")
    args = parser.parse_args()
    args.rl_overrides = {"prompts_per_step": args.prompts_per_step} if args.prompts_per_step else {}
    claims_path = Path(args.claims_out)
    if args.report_only:
        merged = {}
        files = [Path(args.out)] if args.out else sorted((ROOT / "bench/results").glob("claims_*_runs.json"))
        for runs_file in files:
            out = json.loads(runs_file.read_text())
            merged = merge_claims(claims_path, out["pipeline"], analyse(out))
        write_docs(merged)
        return 0
    args.out = args.out or str(ROOT / f"bench/results/claims_{args.pipeline}_runs.json")
    out = run_all(args)
    merged = merge_claims(claims_path, args.pipeline, analyse(out))
    for c in merged["claims"]:
        if c["pipeline"] == args.pipeline:
            h = c["headline"]
            print(f"{c['claim']}: {c['verdict']} (headline {h.get('a', h.get('test'))} vs {h.get('b', '')}: "
                  f"{h.get('diff', h.get('mean', float('nan'))):+.3f} {h.get('t_interval')})", flush=True)
    if not args.no_report:
        write_docs(merged)
    return 0


if __name__ == "__main__":
    sys.exit(main())
