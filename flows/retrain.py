"""retrain: the scheduled retraining flow (deployment `retrain/nightly`, cron in infra/prefect.yaml).

New data files dropped into the inbox folder are moved into data/raw and appended to the pipeline's
`curate.sources`; then `post_training` runs, and DVC re-runs exactly what the new data changed. Whether the
new policy becomes the champion is decided only by the `ope` stage's promotion gate (it must beat the
registered champion's estimate on today's logs); this flow never touches the registry.

    inbox/                  -> split `retrain.split` (default sft)
    inbox/<split>/file      -> that split (sft, rl, logged, eval, ood, real)

Files modified within the last `settle_seconds` are left for the next run (still being written); dotfiles
and *.tmp / *.part are ignored. Ingested originals move to `<inbox>/.ingested/<timestamp>/`. In a git
project the new files and the pipelines.yaml change are committed (workers check out commits; every MLflow
run's `git_commit` tag then names the data it saw).

    python -m flows.retrain --pipeline tiny            (embedded; or trigger the deployment)
"""
from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # as a script: the CLI's embedded defaults, set before prefect is imported
    from alignflow.environment import embedded_defaults
    from alignflow.layout import find_root as _find_root
    embedded_defaults(_find_root())

from prefect import flow  # noqa: E402

from alignflow import versioning
from alignflow.config import ConfigError, load_pipeline, load_project
from alignflow.layout import Layout, find_root
from tasks.retry import stage_task

SPLITS = ("sft", "rl", "logged", "eval", "ood", "real")
SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class RetrainSettings:
    """Defaults of the proposed `retrain` section of a pipeline (alignflow/config.py, RetrainConfig)."""
    inbox: str = "data/inbox"
    split: str = "sft"
    settle_seconds: float = 60.0
    commit: bool = True


def settings_for(root: Path, pipeline: str, **given) -> RetrainSettings:
    cfg = getattr(load_pipeline(pipeline, root / "pipelines.yaml"), "retrain", None)  # once config has it
    base = RetrainSettings(**{k: getattr(cfg, k) for k in RetrainSettings.__dataclass_fields__}) if cfg \
        else RetrainSettings()
    for key, value in given.items():
        if value is not None:
            setattr(base, key, value)
    if base.split not in SPLITS:
        raise ConfigError(f"retrain.split: got {base.split!r}; allowed: {list(SPLITS)}")
    return base


def arrived(inbox: Path, default_split: str, settle_seconds: float, now: float | None = None) -> list[tuple[Path, str]]:
    """(file, split) for every settled data file in the inbox, oldest first."""
    now = time.time() if now is None else now
    found = []
    for path in sorted(inbox.rglob("*")):
        rel = path.relative_to(inbox)
        if (not path.is_file() or any(part.startswith(".") for part in rel.parts)
                or path.suffix not in SUFFIXES or now - path.stat().st_mtime < settle_seconds):
            continue
        split = rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in SPLITS else default_split
        found.append((path, split))
    return sorted(found, key=lambda item: item[0].stat().st_mtime)


def _unique(dest: Path) -> Path:
    n, candidate = 2, dest
    while candidate.exists():
        candidate = dest.with_name(f"{dest.stem}-{n}{dest.suffix}")
        n += 1
    return candidate


def _add_sources(root: Path, pipeline: str, entries: list[dict]) -> None:
    """Append to pipelines.<pipeline>.curate.sources, keeping the file's comments; validated before it lands."""
    def add(raw: dict) -> None:
        curate = raw["pipelines"][pipeline].setdefault("curate", {})
        curate["sources"] = [*(curate.get("sources") or []), *entries]
    versioning.edit_yaml(root / "pipelines.yaml", add, validate=load_project)  # ConfigError names the key


def _commit(root: Path, paths: list[str], message: str) -> str | None:
    if subprocess.run(["git", "rev-parse", "--git-dir"], cwd=root, capture_output=True).returncode != 0:
        return None
    ident = [] if subprocess.run(["git", "config", "user.email"], cwd=root, capture_output=True).returncode == 0 \
        else ["-c", "user.name=alignflow retrain", "-c", "user.email=retrain@alignflow.invalid"]
    subprocess.run(["git", "add", "--", *paths], cwd=root, check=True, capture_output=True)
    subprocess.run(["git", *ident, "commit", "-q", "-m", message, "--", *paths], cwd=root, check=True,
                   capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()


@stage_task
def ingest(root: Path, pipeline: str, settings: RetrainSettings) -> dict:
    """Move settled inbox files into data/raw and register them as curate sources."""
    inbox = Path(settings.inbox) if Path(settings.inbox).is_absolute() else root / settings.inbox
    if not inbox.is_dir():
        return {"ingested": [], "duplicates": [], "inbox": str(inbox), "commit": None}
    raw = root / "data" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    done_dir = inbox / ".ingested" / time.strftime("%Y%m%dT%H%M%S")
    known = {s.path for s in load_pipeline(pipeline, root / "pipelines.yaml").curate.sources}
    entries, ingested, duplicates = [], [], []
    for path, split in arrived(inbox, settings.split, settings.settle_seconds):
        same = [p for p in raw.glob(f"*{path.suffix}") if p.is_file() and filecmp.cmp(p, path, shallow=False)]
        if same and same[0].relative_to(root).as_posix() in known:  # already a source: nothing new in it
            duplicates.append(path.name)
        else:
            dest = _unique(raw / path.name)
            shutil.copy2(path, dest)
            rel = dest.relative_to(root).as_posix()
            entries.append({"path": rel, "split": split})
            ingested.append(rel)
        done_dir.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), _unique(done_dir / path.relative_to(inbox).as_posix().replace("/", "__")))
    if entries:
        try:
            _add_sources(root, pipeline, entries)
        except ConfigError:
            for rel in ingested:
                (root / rel).unlink(missing_ok=True)
            raise
    sha = None
    if entries and settings.commit:
        sha = _commit(root, [*ingested, "pipelines.yaml"],
                      f"retrain({pipeline}): ingest {len(ingested)} file(s) from {settings.inbox}")
    for rel in ingested:
        print(f"ingested {rel} (split {next(e['split'] for e in entries if e['path'] == rel)})")
    return {"ingested": ingested, "duplicates": duplicates, "inbox": str(inbox), "commit": sha}


@flow(name="retrain", flow_run_name="retrain-{pipeline}", log_prints=True)
def retrain(pipeline: str = "tiny", inbox: str | None = None, split: str | None = None,
            settle_seconds: float | None = None, commit: bool | None = None) -> dict:
    """Ingest what arrived, then post_training (which re-runs only what changed). Empty inbox: nothing runs."""
    from flows.post_training import check_request, post_training

    root = find_root()
    check_request(root, pipeline, [])
    settings = settings_for(root, pipeline, inbox=inbox, split=split, settle_seconds=settle_seconds, commit=commit)
    got = ingest(root, pipeline, settings)
    if not got["ingested"]:
        print(f"nothing new in {got['inbox']}: no retraining")
        return {**got, "ran": {}, "champion": None, "promoted": False}
    ran = post_training(pipeline=pipeline)
    import json
    ope_json = Layout(root, pipeline).metrics_file("ope")
    ope = json.loads(ope_json.read_text()) if ope_json.exists() else {}
    print(f"champion {ope.get('champion')}: promoted={ope.get('promoted')} ({ope.get('promotion_reason')})")
    return {**got, "ran": ran, "champion": ope.get("champion"), "promoted": bool(ope.get("promoted")),
            "promotion_reason": ope.get("promotion_reason")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default="tiny")
    parser.add_argument("--inbox")
    parser.add_argument("--settle-seconds", type=float)
    args = parser.parse_args(argv)
    from alignflow.versioning import run_lock
    from flows import no_heartbeat
    with run_lock(find_root()), no_heartbeat():
        print(retrain(pipeline=args.pipeline, inbox=args.inbox, settle_seconds=args.settle_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
