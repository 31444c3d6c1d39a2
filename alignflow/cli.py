"""`alignflow` command line.

    alignflow run [--pipeline tiny] [-S key.path=value ...]   the whole chain (Prefect flow over DVC stages)
    alignflow stage NAME --pipeline P                         one stage (what dvc.yaml's cmd calls)
    alignflow validate-data PATH... [--quarantine FILE]       the curate checks, standalone
    alignflow algorithms                                      the registered RL methods
    alignflow check-config [--pipeline NAME]                  validate pipelines.yaml (and pre-flight a pipeline)
    alignflow dvc-yaml [--check]                              write (check) dvc.yaml from the stage table
    alignflow infra up|down|status [--database-url URL]       the scaled mode's servers and workers (docs/scaling.md)
    alignflow vllm-env                                        build .venv-vllm for `rl.engine: vllm` (docs/vllm.md)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def cmd_run(args) -> int:
    from alignflow.layout import find_root
    from alignflow.versioning import run_lock
    from flows import no_heartbeat
    from flows.post_training import check_request, post_training, preflight
    root = find_root()
    check_request(root, args.pipeline, args.set or [])  # config errors before any work starts
    if not args.set:  # with overrides the flow pre-flights once they are applied
        preflight(root, args.pipeline)
    with run_lock(root), no_heartbeat():
        post_training(pipeline=args.pipeline, overrides=args.set or [])
    from alignflow.layout import Layout
    layout = Layout(root, args.pipeline)
    print(f"done: {layout.rel(layout.metrics_file('evaluate'))}, {layout.rel(layout.report)}")
    return 0


def cmd_stage(args) -> int:
    from alignflow.stage import STAGES, run_stage
    if args.name not in STAGES:
        print(f"unknown stage {args.name!r}; stages: {list(STAGES)}", file=sys.stderr)
        return 2
    launcher = os.environ.get("ALIGNFLOW_LAUNCHER")  # e.g. "torchrun --standalone --nproc-per-node=gpu" (a GPU pool)
    if launcher and "WORLD_SIZE" not in os.environ and STAGES[args.name].multi_rank:
        import shlex
        import subprocess
        return subprocess.call([*shlex.split(launcher), "-m", "alignflow.cli", "stage", args.name,
                                "--pipeline", args.pipeline])
    from alignflow.train import distributed
    with distributed.process_group():
        if not distributed.is_main():  # the other ranks train alongside rank 0's flow run; rank 0 tracks and writes
            run_stage(args.name, args.pipeline)
            return 0
        from flows import ensure_prefect_api, no_heartbeat
        from flows.stages import FLOWS
        ensure_prefect_api()  # a temporary server when none is set, stopped even if this process is SIGKILLed
        with no_heartbeat():
            FLOWS[args.name](pipeline=args.pipeline)
    return 0


def cmd_dvc_yaml(args) -> int:
    """Write dvc.yaml from the stage table (or, with --check, fail when the committed one differs)."""
    from alignflow import versioning
    from alignflow.layout import find_root
    from alignflow.stage import STAGES
    root = find_root()
    text = versioning.render_dvc_yaml(root, STAGES)
    if args.check:
        if (root / "dvc.yaml").read_text() != text:
            print("dvc.yaml differs from the stage table: run `alignflow dvc-yaml`", file=sys.stderr)
            return 1
        print("dvc.yaml matches the stage table")
        return 0
    (root / "dvc.yaml").write_text(text)
    print(f"wrote {root / 'dvc.yaml'}")
    return 0


def cmd_validate_data(args) -> int:
    from alignflow.data.curate import validate_data
    columns = {}
    for item in args.columns or []:
        ours, sep, theirs = item.partition("=")
        if not sep:
            print(f"error: --columns {item!r}: expected FIELD=COLUMN, e.g. prompt=question", file=sys.stderr)
            return 2
        columns[ours] = theirs
    return validate_data(args.paths, Path(args.quarantine), max_chars=args.max_chars, split=args.split,
                         columns=columns, dataset_split=args.dataset_split)


def cmd_algorithms(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from alignflow.algorithms import ALGORITHMS
    table = Table("name", "what it does", "needs", "paper")
    for name, algo in ALGORITHMS.items():
        table.add_row(name, algo.summary, ", ".join(algo.needs) or "-", algo.paper)
    Console().print(table)
    return 0


def cmd_import_tracking(args) -> int:
    from alignflow import tracking
    from alignflow.layout import find_root
    n = tracking.import_file_runs(find_root())
    print(f"imported {n} run(s) recorded without MLflow (python -m alignflow.steps) into {tracking.tracking_uri(find_root())}")
    return 0


def cmd_export_splits(args) -> int:
    """JSON Lines copies of a pipeline's curated splits, for a machine without pyarrow (read by read_split)."""
    import pandas as pd

    from alignflow.layout import Layout, find_root
    curated = Layout(find_root(), args.pipeline).curated
    for path in sorted(curated.glob("*.parquet")):
        pd.read_parquet(path).to_json(path.with_suffix(".jsonl"), orient="records", lines=True)
        print(path.with_suffix(".jsonl"))
    return 0


def cmd_check_config(args) -> int:
    """Validate pipelines.yaml; with --pipeline also pre-flight that pipeline's model, rewards and data."""
    import json

    from alignflow import preflight
    from alignflow.config import load_project
    project = load_project(Path(args.config))
    if not args.pipeline:
        print(f"ok: pipelines {sorted(project.pipelines)}, tracked {project.tracked}")
        return 0
    if args.pipeline not in project.pipelines:
        print(f"error: --pipeline {args.pipeline!r}: unknown; defined: {sorted(project.pipelines)}", file=sys.stderr)
        return 2
    root = Path(args.config).resolve().parent
    problems, summary = preflight.check(root, args.pipeline, project.pipelines[args.pipeline])
    print(json.dumps(summary, indent=2, default=str))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print(f"ok: pipeline {args.pipeline!r}: model, rewards and data pass the pre-flight")
    return 1 if problems else 0


def cmd_fingerprint(args) -> int:
    """dvc.yaml's external@<pipeline>: fingerprint the checkpoints and reward files pipelines.yaml names."""
    from alignflow import fingerprint
    from alignflow.config import load_pipeline
    from alignflow.layout import find_root
    root = find_root()
    print(fingerprint.write(root, args.pipeline, load_pipeline(args.pipeline, root / "pipelines.yaml")))
    return 0


# ---- [scaled mode] `alignflow infra up|down|status` (alignflow/infra.py, docs/scaling.md)
def cmd_infra(args) -> int:
    import json

    from alignflow import infra
    from alignflow.layout import find_root
    try:
        root = Path(args.root).resolve() if args.root else find_root()
    except FileNotFoundError:
        root = Path.cwd()
    if args.action == "up":
        settings = infra.Settings(root=root, host=args.host, prefect_port=args.prefect_port,
                                  mlflow_port=args.mlflow_port, gpus=args.gpus, cpu_limit=args.cpu_limit,
                                  database_url=args.database_url or os.environ.get("ALIGNFLOW_DATABASE_URL"),
                                  deploy=not args.no_deploy)
        try:
            infra.up(settings)
        except infra.InfraError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0
    if args.action == "down":
        infra.down(root, drain_timeout=args.drain_timeout)
        return 0
    st = infra.status(root)
    print(json.dumps(st, indent=2) if args.json else infra.format_status(st))
    return 0 if st.get("running") else 1


# ---- [vllm] `alignflow vllm-env`: vLLM's own environment (scripts/vllm_env.sh, docs/vllm.md)
def cmd_vllm_env(args) -> int:
    import subprocess

    from alignflow.rollout.vllm_engine import REPO
    return subprocess.run(["bash", str(REPO / "scripts" / "vllm_env.sh")], cwd=REPO).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the whole pipeline")
    p.add_argument("--pipeline", default="tiny")
    p.add_argument("-S", "--set", action="append", metavar="KEY.PATH=VALUE",
                   help="override pipelines.<pipeline>.KEY.PATH (applied through DVC, like `dvc exp run -S`)")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("stage", help="run one stage (dvc.yaml calls this)")
    p.add_argument("name")
    p.add_argument("--pipeline", default="tiny")
    p.set_defaults(fn=cmd_stage)
    p = sub.add_parser("validate-data", help="check data files; write the quarantine report")
    p.add_argument("paths", nargs="+")
    p.add_argument("--quarantine", default="quarantine.jsonl")
    p.add_argument("--max-chars", type=int, default=1024)
    p.add_argument("--split", default="sft")
    p.add_argument("--columns", action="append", metavar="FIELD=COLUMN",
                   help="map our field to the file's column, as a source's `columns:` does (repeatable)")
    p.add_argument("--dataset-split", help="which split of a DatasetDict / data folder")
    p.set_defaults(fn=cmd_validate_data)
    sub.add_parser("algorithms", help="list the RL methods").set_defaults(fn=cmd_algorithms)
    sub.add_parser("import-tracking", help="load runs recorded without MLflow into MLflow").set_defaults(
        fn=cmd_import_tracking)
    p = sub.add_parser("export-splits", help="JSON Lines copies of curated splits (for a box without pyarrow)")
    p.add_argument("--pipeline", default="tiny")
    p.set_defaults(fn=cmd_export_splits)
    p = sub.add_parser("check-config", help="validate pipelines.yaml; --pipeline NAME: pre-flight its model, rewards, data")
    p.add_argument("--config", default="pipelines.yaml")
    p.add_argument("--pipeline", help="also load the model and tokenizer, render a prompt, call the rewards")
    p.set_defaults(fn=cmd_check_config)
    p = sub.add_parser("fingerprint", help="fingerprint external checkpoints and reward files (dvc.yaml calls this)")
    p.add_argument("--pipeline", default="tiny")
    p.set_defaults(fn=cmd_fingerprint)
    p = sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage table (alignflow/stage.py)")
    p.add_argument("--check", action="store_true", help="only check that dvc.yaml matches")
    p.set_defaults(fn=cmd_dvc_yaml)
    p = sub.add_parser("infra", help="start/stop/show the scaled mode's server set (no containers)")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--root", help="project root (default: the current directory)")
    p.add_argument("--host", default="127.0.0.1", help="bind address; beyond loopback auth is required")
    p.add_argument("--prefect-port", type=int, default=None, help="default 4200 if free; 0: any free port")
    p.add_argument("--mlflow-port", type=int, default=None, help="default 5000 if free; 0: any free port")
    p.add_argument("--database-url", help="postgresql://user@host:port/db for Prefect (created if missing); "
                   "default $ALIGNFLOW_DATABASE_URL, else SQLite")
    p.add_argument("--gpus", type=int, default=1, help="concurrency limit of the gpu pool")
    p.add_argument("--cpu-limit", type=int, default=None, help="flow runs the cpu worker runs at once")
    p.add_argument("--no-deploy", action="store_true", help="skip deploying infra/prefect.yaml")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="down: seconds to wait for running flow runs")
    p.add_argument("--json", action="store_true", help="status as JSON")
    p.set_defaults(fn=cmd_infra)
    sub.add_parser("vllm-env", help="build .venv-vllm (vLLM's own environment) for rl.engine: vllm").set_defaults(
        fn=cmd_vllm_env)  # [vllm]
    args = parser.parse_args(argv)

    try:
        from alignflow.layout import find_root
        root = find_root()
    except FileNotFoundError:
        root = None
    from alignflow.environment import embedded_defaults
    embedded_defaults(root)
    from alignflow.config import ConfigError
    from alignflow.versioning import AlreadyRunningError
    try:
        return args.fn(args)
    except (ConfigError, AlreadyRunningError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the stage stopped; its last checkpoint resumes on the next run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
