"""Scaled mode, the deployments: `infra/prefect.yaml`'s deployments created against PREFECT_API_URL, and the
light flow `infra-check` (is a pool alive?). The stage job is flows/stage_job.py, the dispatch flows/dispatch.py.

    python -m flows.deploy [--root .] [--prefect-file infra/prefect.yaml]     (`alignflow infra up` calls it)
    ALIGNFLOW_ROOT=$PWD prefect --no-prompt deploy --all --prefect-file infra/prefect.yaml   (same result)
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

from prefect import flow


# ---------------------------------------------------------------- a light flow: is a pool alive?
@flow(name="infra-check", flow_run_name="infra-check-{message}", log_prints=True, persist_result=True)
def infra_check(message: str = "ping", sleep_s: float = 0.0) -> dict:
    """Answers from whichever worker ran it: host, working directory, visible GPUs. (UI and load tests.)"""
    if sleep_s:
        time.sleep(sleep_s)
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    answer = {"message": message, "host": socket.gethostname(), "cwd": os.getcwd(), "pid": os.getpid(),
              "cuda_visible_devices": gpus}
    print(f"infra-check {message!r} from {answer['host']} (CUDA_VISIBLE_DEVICES={gpus})")
    return answer


# ---------------------------------------------------------------- deploying
def load_prefect_yaml(path: Path) -> list[dict]:
    import yaml
    return yaml.safe_load(path.read_text())["deployments"]


def deploy_all(root: Path, prefect_file: str = "infra/prefect.yaml", names: list[str] | None = None) -> list[str]:
    """`flow.from_source(root, entrypoint).deploy(...)` for each deployment in prefect.yaml: the same set
    `prefect deploy --all --prefect-file infra/prefect.yaml` creates, without its prompts."""
    from prefect import flow as prefect_flow
    from prefect.schedules import Cron

    root = Path(root).resolve()
    done = []
    for spec in load_prefect_yaml(root / prefect_file):
        if names and spec["name"] not in names:
            continue
        loaded = prefect_flow.from_source(source=str(root), entrypoint=spec["entrypoint"])
        schedules = [Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
                     for s in spec.get("schedules") or []]
        loaded.deploy(name=spec["name"], work_pool_name=spec["work_pool"]["name"],
                      job_variables=spec["work_pool"].get("job_variables") or None,
                      parameters=spec.get("parameters") or {}, description=spec.get("description"),
                      tags=spec.get("tags") or None, schedules=schedules or None, build=False, push=False,
                      print_next_steps=False, ignore_warnings=True)
        done.append(f"{loaded.name}/{spec['name']}")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".")
    parser.add_argument("--prefect-file", default="infra/prefect.yaml")
    parser.add_argument("names", nargs="*", help="only these deployment names (default: all)")
    args = parser.parse_args(argv)
    for name in deploy_all(Path(args.root), args.prefect_file, args.names or None):
        print(f"deployed {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
