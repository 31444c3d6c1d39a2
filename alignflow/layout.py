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
    def base(self) -> Path: return self._p("models", self.pipeline, "base")
    @property
    def sft(self) -> Path: return self._p("models", self.pipeline, "sft")
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


def write_csv(path: Path, rows: list[dict]) -> None:
    import csv
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
