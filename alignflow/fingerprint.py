"""What DVC cannot see by itself: the checkpoints (`base.path`, `teacher.path`) and the reward / metric files a
pipeline names in pipelines.yaml (DVC cannot template a param's value into a stage's deps).

dvc.yaml's `external@<p>` stage (always run, seconds) writes `metrics/<p>/external.json` with a fingerprint of each;
the stages using them depend on that file, so a changed checkpoint or reward file re-runs them and everything
downstream, while an unchanged one leaves the file byte-identical and DVC skips the rest. Small files (config,
tokenizer) are hashed; weight files are fingerprinted by name, size and modification time, as DVC's own cache
does for unchanged files, so a multi-GB checkpoint costs no read."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

SMALL = 16 * 2**20  # hash files below 16 MiB outright


def fingerprint_dir(path: Path) -> dict:
    files = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = f.stat()
        rel = f.relative_to(path).as_posix()
        if stat.st_size < SMALL:
            files[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
        else:
            files[rel] = f"size={stat.st_size};mtime_ns={stat.st_mtime_ns}"
    return files


def fingerprint(root: Path, paths: dict[str, str | None]) -> dict:
    """{name: {"path": ..., "files": {...}}} for each named checkpoint path (None: trained by the pipeline)."""
    out = {}
    for name, rel in paths.items():
        if rel is None:
            out[name] = {"path": None}
            continue
        path = (Path(root) / rel).resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"{name}.path {rel!r}: no such directory")
        out[name] = {"path": rel, "files": fingerprint_dir(path)}
    return out


def reward_files(root: Path, cfg) -> dict[str, str]:
    """{file as written in the spec: sha256} of every reward / metric function given as a file path."""
    out = {}
    for spec in [*cfg.reward_specs, *cfg.metric_specs]:
        target = spec.function.rpartition(":")[0]
        if target.endswith(".py"):
            path = Path(root) / target
            out[target] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
    return out


def write(root: Path, pipeline: str, cfg) -> Path:
    from alignflow.layout import Layout, write_json
    target = Layout(Path(root), pipeline).external_fingerprint
    new = {**fingerprint(root, {"base": cfg.base.path, "teacher": cfg.teacher.path}),
           "reward_files": reward_files(root, cfg)}
    if not target.exists() or json.loads(target.read_text()) != new:  # unchanged: keep the file as it is
        write_json(target, new)
    return target
