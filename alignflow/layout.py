"""Every path a stage of a named pipeline reads or writes, and the file names inside them: the one place they
are spelled (dvc.yaml is generated from these and the stage table); pipelines keep their outputs apart by name."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
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

    # files inside the outputs above
    @property
    def logged_file(self) -> Path: return self.logged / "logged.parquet"
    @property
    def ope_inputs(self) -> Path: return self.ope / "inputs.npz"
    @property
    def ope_details(self) -> Path: return self.ope / "selection.json"
    @property
    def report(self) -> Path: return self.reports / "report.html"
    @property
    def evaluate_details(self) -> Path: return self.reports / "evaluate.json"
    @property
    def device_scores(self) -> Path: return self.reports / "device_scores.json"

    def metrics_file(self, stage: str) -> Path:
        """metrics/<p>/<stage>.json: the stage's headline figures (`dvc metrics show`)."""
        return self.metrics / f"{stage}.json"

    def plot_file(self, name: str) -> Path:
        """metrics/<p>/<name>.csv: a DVC plot (a learning curve, a scatter)."""
        return self.metrics / f"{name}.csv"

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


@contextmanager
def atomic_path(path: Path):
    """Yields a sibling temp path to write; renamed onto `path` only if the block finishes, so a reader (or a
    resumed stage) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False))


def write_csv(path: Path, rows: list[dict], header: list[str] | None = None) -> None:
    """rows as CSV (atomically); `header` names the columns when there are no rows."""
    import csv
    keys = list(dict.fromkeys(k for row in rows for k in row)) or list(header or [])
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
