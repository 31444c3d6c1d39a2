"""Chaos benchmark: kill the pipeline at a random moment in a random stage, resume, and compare.

For each run: a fresh project (the `smoke` pipeline), `alignflow run` started and signalled (the whole
process group: the parent flow, DVC and the stage's trainer) at a random moment while a randomly chosen
stage is running, with a signal drawn from --signals: KILL (the machine or the OOM killer), INT (Ctrl-C in a
terminal) or TERM (what Prefect's runner sends the process group when a flow run is cancelled from the UI,
before a KILL after its grace period). Every process of the group must be gone within 30 s. Then
`alignflow run` again, which must resume (DVC skips the finished stages, the interrupted stage resumes from
its last checkpoint) and finish. The resumed run's final metrics are
compared with an uninterrupted reference run, and every artifact is checked for corruption (every
model directory loads, every Parquet/JSON file parses, no temporary half-written file is left behind
as an output).

    python bench/chaos.py --runs 20            # writes bench/results/chaos.json
    python bench/chaos.py --runs 2 --signals INT TERM --out /tmp/chaos.json   # the CI version
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.conftest import BIN, make_project, project_env  # noqa: E402

from alignflow.stage import STAGES  # noqa: E402
COMPARED = ("eval_score", "ood_score", "sampled_value")


def final_metrics(root: Path) -> dict:
    """Per policy the headline scores and every metric figure, and the champion."""
    ev = json.loads((root / "reports/smoke/evaluate.json").read_text())
    return {name: {**{k: v[k] for k in COMPARED}, "metrics": ev["metrics"][name]}
            for name, v in ev["policies"].items()} | {"champion": ev["champion"]}


def corrupt_artifacts(root: Path) -> list[str]:
    """Every output must be complete: loadable models, parseable tables and JSON, no leftover temp outputs."""
    import pandas as pd
    from safetensors.torch import load_file
    bad = []
    for path in root.glob("models/smoke/**/model.safetensors"):
        try:
            load_file(path)
        except Exception as err:  # noqa: BLE001 (any failure means a corrupt artifact)
            bad.append(f"{path}: {err}")
    for path in root.glob("data/smoke/**/*.parquet"):
        try:
            pd.read_parquet(path)
        except Exception as err:  # noqa: BLE001
            bad.append(f"{path}: {err}")
    for path in list(root.glob("metrics/smoke/*.json")):
        try:
            json.loads(path.read_text())
        except ValueError as err:
            bad.append(f"{path}: {err}")
    for folder in ("data/smoke", "models/smoke", "metrics/smoke", "reports/smoke"):
        bad += [f"{p}: temporary file left as output" for p in (root / folder).rglob("*.tmp")]
    return bad


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def run_pipeline(root: Path, kill_stage: str | None = None, rng: random.Random | None = None,
                 sig: signal.Signals = signal.SIGKILL, max_delay: float = 12.0, timeout: float = 900) -> dict:
    """Run `alignflow run`; with kill_stage, signal its process group at a random moment inside that stage."""
    log = (root / "chaos.log").open("a")
    proc = subprocess.Popen([str(BIN / "alignflow"), "run", "--pipeline", "smoke"], cwd=root, env=project_env(root),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started, killed_at, stopped_in = time.time(), None, None
    if kill_stage:
        marker = f"Running stage '{kill_stage}@smoke'"
        while proc.poll() is None and time.time() - started < timeout:
            if marker in (root / "chaos.log").read_text(errors="replace"):
                time.sleep(rng.uniform(0.5, max_delay))  # somewhere inside the stage (imports, training, writing)
                if proc.poll() is None:
                    os.killpg(proc.pid, sig)
                    killed_at = time.time() - started
                break
            time.sleep(0.2)
    proc.wait(timeout=timeout)
    if killed_at is not None:  # the whole group (DVC, the stage, its trainer) must stop, not only the parent
        while group_alive(proc.pid) and time.time() - started - killed_at < 30:
            time.sleep(0.2)
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            stopped_in = round(time.time() - started - killed_at, 1)
    return {"returncode": proc.returncode, "killed_at_s": killed_at, "stopped_in_s": stopped_in,
            "seconds": time.time() - started}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=12.0, help="latest signal, seconds into the stage")
    parser.add_argument("--signals", nargs="+", default=["KILL", "INT", "TERM"], choices=["KILL", "INT", "TERM"])
    parser.add_argument("--out", default=str(REPO / "bench/results/chaos.json"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        reference_root = make_project(Path(tmp) / "reference")
        ref = run_pipeline(reference_root)
        assert ref["returncode"] == 0, (reference_root / "chaos.log").read_text()[-3000:]
        reference = final_metrics(reference_root)
        trials = []
        for i in range(args.runs):
            root = make_project(Path(tmp) / f"run{i}")
            stage, sig = rng.choice(list(STAGES)), rng.choice(args.signals)
            first = run_pipeline(root, kill_stage=stage, rng=rng, sig=signal.Signals[f"SIG{sig}"],
                                 max_delay=args.max_delay)
            second = run_pipeline(root)
            resumed_ok = second["returncode"] == 0
            identical = resumed_ok and final_metrics(root) == reference
            corrupt = corrupt_artifacts(root)
            killed = first["killed_at_s"] is not None
            trials.append({"run": i, "stage": stage, "signal": sig, "killed": killed,
                           "killed_at_s": first["killed_at_s"], "stopped_in_s": first["stopped_in_s"],
                           "group_stopped": not killed or first["stopped_in_s"] is not None,
                           "resumed_ok": resumed_ok, "identical": identical,
                           "corrupt": corrupt, "resume_seconds": round(second["seconds"], 1)})
            if not resumed_ok:  # what the resumed run said, for the record
                lines = (root / "chaos.log").read_text(errors="replace").splitlines()
                trials[-1]["resume_log_tail"] = [line[-300:] for line in lines if "it/s" not in line][-40:]
            print(json.dumps(trials[-1]), flush=True)
    result = {"runs": len(trials), "kills": sum(t["killed"] for t in trials),
              "resumed_ok": sum(t["resumed_ok"] for t in trials),
              "identical_results": sum(t["identical"] for t in trials),
              "corrupt_artifacts": sum(len(t["corrupt"]) for t in trials),
              "groups_left_running": sum(not t["group_stopped"] for t in trials),
              "reference_seconds": round(ref["seconds"], 1), "trials": trials,
              "command": "python bench/chaos.py " + " ".join(sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "trials"}, indent=2))
    ok = result["corrupt_artifacts"] == 0 and result["resumed_ok"] == result["runs"] == result["identical_results"]
    return 0 if ok and result["groups_left_running"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
