"""Where each stage of a named pipeline reads and writes. dvc.yaml declares the same paths
(tests/unit/test_layout.py keeps the two in step); pipelines keep their outputs apart by name."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path
    pipeline: str

    def _p(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def curated(self) -> Path: return self._p("data", self.pipeline, "curated")
    @property
    def external_fingerprint(self) -> Path: return self._p("metrics", self.pipeline, "external.json")
    @property
    def base(self) -> Path: return self._p("models", self.pipeline, "base")
    @property
    def sft(self) -> Path: return self._p("models", self.pipeline, "sft")
    @property
    def teacher(self) -> Path: return self._p("models", self.pipeline, "teacher")
    @property
    def rl(self) -> Path: return self._p("models", self.pipeline, "rl")
    @property
    def logged(self) -> Path: return self._p("data", self.pipeline, "logged")
    @property
    def ope(self) -> Path: return self._p("data", self.pipeline, "ope")
    @property
    def metrics(self) -> Path: return self._p("metrics", self.pipeline)
    @property
    def reports(self) -> Path: return self._p("reports", self.pipeline)

    def checkpoints(self, stage: str) -> Path:
        """Outside every DVC out, so a killed stage resumes instead of starting over."""
        return self._p("checkpoints", self.pipeline, stage)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def find_root(start: Path | None = None) -> Path:
    """The project root: ALIGNFLOW_ROOT, else the nearest folder upwards holding dvc.yaml and pipelines.yaml."""
    if os.environ.get("ALIGNFLOW_ROOT"):
        return Path(os.environ["ALIGNFLOW_ROOT"]).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").exists() and (folder / "pipelines.yaml").exists():
            return folder
    raise FileNotFoundError(f"no dvc.yaml + pipelines.yaml in {here} or above: run from the project root")


def write_json(path: Path, data: dict) -> None:
    """Atomic: write a sibling temp file, then rename; a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False))
    os.replace(tmp, path)


def write_csv(path: Path, rows: list[dict], header: list[str] | None = None) -> None:
    """rows as CSV (atomically); `header` names the columns when there are no rows."""
    import csv
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    keys = list(dict.fromkeys(k for row in rows for k in row)) or list(header or [])
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


class AlreadyRunningError(RuntimeError):
    pass


class run_lock:
    """One pipeline run per project directory: a second `alignflow run` gets a clear error instead of two
    runs writing the same outputs. flock is released by the kernel if the holder dies (no stale locks)."""

    def __init__(self, root: Path):
        self.path = root / ".alignflow" / "run.lock"

    def __enter__(self):
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = self.path.open("a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise AlreadyRunningError(f"a pipeline is already running in {self.path.parent.parent} ({holder}); "
                                      "wait for it or stop it first") from None
        self.handle.truncate(0)
        self.handle.write(f"pid {os.getpid()}")
        self.handle.flush()
        recover_dvc_rwlock(self.path.parent.parent)
        return self

    def __exit__(self, *exc):
        import fcntl
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def recover_dvc_rwlock(root: Path) -> bool:
    """DVC rewrites `.dvc/tmp/rwlock` in place (truncate, then write), so a process killed in between leaves
    it empty or cut, and every later `dvc repro` stops with RWLockFileCorruptedError (found by
    bench/chaos.py). Called under run_lock, when no run of ours is live here: a file that does not parse is
    a dead process's leftover; it is moved aside (kept for inspection) and DVC starts a fresh one."""
    path = root / ".dvc" / "tmp" / "rwlock"
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return False
    except FileNotFoundError:
        return False
    except (ValueError, UnicodeDecodeError):
        aside = path.with_name(f"rwlock.corrupt-{os.getpid()}")
        path.replace(aside)
        print(f"warning: {path} was cut short by a killed process; moved to {aside.name}, DVC starts a new one")
        return True
