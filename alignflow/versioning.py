"""Everything that drives DVC, in one module: dvc.yaml generated from the stage table, `dvc repro` of a stage,
overrides written the way `dvc exp run -S` writes them, pipelines.yaml edits that keep comments, the remote,
pull / push of a stage, the hashes dvc.lock recorded, and recovery of a lock a killed DVC left cut short.

dvc.yaml's deps are each stage's code closure (alignflow/codegraph.py: every project file its flow and its step
import, lazily or not), so a change to any code a stage runs re-runs it, and nothing else does."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml

from alignflow import codegraph
from alignflow.layout import Layout

ITEM = "${item}"  # dvc.yaml's foreach variable: the tracked pipeline's name
FLOWS_FILE = "flows/stages.py"
STAGE_TABLE = "alignflow/stage.py"
EXTERNAL_CODE = "alignflow/fingerprint.py"


# ---------------------------------------------------------------- dvc.yaml from the stage table
def code_deps(root: Path, start: list[str]) -> list[str]:
    """The project files reachable from `start` (paths relative to root), a package listed as its folder when
    every Python file in it is reached."""
    files = codegraph.closure(root, [root / s for s in start], skip_strings_in=(root / STAGE_TABLE,))
    rel = {f.relative_to(root).as_posix() for f in files}
    folders = sorted({Path(r).parent.as_posix() for r in rel if Path(r).parent.as_posix() not in (".", "flows", "tasks")})
    whole = [d for d in folders if {p.relative_to(root).as_posix() for p in (root / d).rglob("*.py")} <= rel]
    whole = [d for d in whole if not any(d.startswith(f"{o}/") for o in whole)]  # the outermost folder only
    return sorted(whole + [r for r in rel if not any(r.startswith(f"{d}/") for d in whole)])


def stage_code(root: Path, spec) -> list[str]:
    """What `alignflow stage <name>` runs: the stage's flow, the table, and the step's module (with closures)."""
    module = spec.run.partition(":")[0]
    return code_deps(root, [FLOWS_FILE, codegraph.module_file(root, module).relative_to(root).as_posix()])


def _stage_entry(root: Path, spec) -> dict:
    layout = Layout(Path("."), ITEM)
    path = lambda attr: layout.rel(getattr(layout, attr))  # noqa: E731
    deps = stage_code(root, spec) + ["data/raw"] * spec.raw_data + [path(a) for a in spec.inputs]
    deps += [layout.rel(layout.external_fingerprint)] * spec.external
    entry = {"cmd": f"alignflow stage {spec.name} --pipeline {ITEM}", "deps": deps,
             "params": [{"pipelines.yaml": [f"pipelines.{ITEM}.{key}" for key in spec.params]}],
             "outs": [path(a) for a in spec.outs],
             "metrics": [{layout.rel(layout.metrics_file(spec.name)): {"cache": False}}]}
    if spec.plots:
        entry["plots"] = [{layout.rel(layout.plot_file(name)): {"cache": False, **axes}}
                          for name, axes in spec.plots.items()]
    return {"foreach": "${tracked}", "do": entry}


HEADER = """\
# GENERATED from the stage table (alignflow/stage.py STAGES) by `alignflow dvc-yaml`; edit the table, not this.
# Each stage runs once per tracked pipeline (`<stage>@<name>`); deps are the stage's code closure
# (alignflow/versioning.py), its inputs and, where it reads files pipelines.yaml names, external.json;
# params are the pipeline config keys the stage reads. tests/unit/test_layers.py checks this file is current.
"""


def render_dvc_yaml(root: Path, stages: dict) -> str:
    """dvc.yaml for the stage table `stages` (alignflow.stage.STAGES)."""
    layout = Layout(Path("."), ITEM)
    external = {"foreach": "${tracked}", "do": {
        # what pipelines.yaml names but DVC cannot template into deps (base.path, teacher.path, reward files):
        # fingerprinted on every repro (seconds); the stages that read them depend on its file
        "cmd": f"alignflow fingerprint --pipeline {ITEM}", "always_changed": True,
        "deps": code_deps(root, [EXTERNAL_CODE]),
        "outs": [{layout.rel(layout.external_fingerprint): {"cache": False}}]}}
    doc = {"vars": ["pipelines.yaml:tracked"],
           "stages": {"external": external, **{name: _stage_entry(root, spec) for name, spec in stages.items()}}}
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=120)


# ---------------------------------------------------------------- running DVC
@contextmanager
def at(path: Path):
    """DVC reads the repository of the current directory: be there."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def reproduce(root: Path, target: str) -> list[str]:
    """`dvc repro -s <target>`: runs the stage only if its deps, params or outs changed; the stages that ran."""
    from dvc.repo import Repo
    with at(root), Repo(str(root)) as repo:
        return [stage.addressing for stage in repo.reproduce(targets=[target], single_item=True)]


def pull_repro_push(work: Path, target: str, timings: dict) -> list[str]:
    """A scaled-mode job: `dvc pull` the stage's inputs, `dvc repro -s` it, `dvc push` its outputs."""
    import time

    from dvc.repo import Repo
    with Repo(str(work)) as repo:
        t0 = time.perf_counter()
        repo.pull(targets=[target], with_deps=True, allow_missing=True, force=True)
        timings["pull_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ran = [s.addressing for s in repo.reproduce(targets=[target], single_item=True)]
        timings["repro_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        repo.push(targets=[target])
        timings["push_s"] = time.perf_counter() - t0
    return ran


def uncached_outs(root: Path, pipeline: str, stage: str | None = None) -> list[str]:
    """The `cache: false` outs (metrics, plots) of the pipeline's stages (of one stage if given): what git carries."""
    from dvc.repo import Repo
    uncached = []
    with at(root), Repo(str(root)) as repo:
        for st in repo.index.stages:
            name, _, item = st.addressing.partition("@")
            if item == pipeline and stage in (None, name):
                uncached += [Path(str(o.def_path)).as_posix() for o in st.outs if not o.use_cache]
    return uncached


def lock_hashes(root: Path, paths: list[str]) -> dict[str, str]:
    """md5 of each path as recorded in dvc.lock by the stage that produced it."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return {}
    recorded = {}
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            recorded[out["path"]] = out.get("md5", "")
    return {path: recorded.get(path, "not in dvc.lock") for path in paths}


# ---------------------------------------------------------------- pipelines.yaml edits
def _has_key(raw: dict, dotted: str) -> bool:
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def apply_overrides(root: Path, pipeline: str, overrides: list[str], validate, dry_run: bool = False) -> None:
    """Validate `pipelines.<pipeline>.<key>=value` overrides on a copy (`validate(path)` raises naming the key),
    then let DVC's own override code (behind `dvc exp run -S`) write them, so DVC sees a params change."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides as dvc_apply

    from alignflow.config import ConfigError
    raw = yaml.safe_load((root / "pipelines.yaml").read_text())
    full = []
    for item in overrides:
        key = f"pipelines.{pipeline}.{item.partition('=')[0]}"
        # a key left at its default is absent from the file: hydra adds it with "+" (the schema check below
        # still rejects keys the config model does not know)
        full.append(("" if _has_key(raw, key) else "+") + f"pipelines.{pipeline}.{item}")
    with tempfile.TemporaryDirectory() as tmp:
        trial = Path(tmp) / "pipelines.yaml"
        shutil.copy(root / "pipelines.yaml", trial)
        try:
            dvc_apply(trial, full)
        except InvalidArgumentError as err:
            cause = err.__cause__ or err
            raise ConfigError(f"-S {' '.join(overrides)}: {str(cause).splitlines()[0]}") from None
        validate(trial)
    if not dry_run:
        dvc_apply(root / "pipelines.yaml", full)


def edit_yaml(path: Path, edit, validate) -> None:
    """Apply `edit(raw)` to a YAML file keeping its comments (DVC's modify_yaml), validated on a copy first."""
    from dvc.utils.serialize import modify_yaml
    with tempfile.TemporaryDirectory() as tmp:
        trial = Path(tmp) / path.name
        shutil.copy(path, trial)
        with modify_yaml(trial) as raw:
            edit(raw)
        validate(trial)
        shutil.copy(trial, path)


# ---------------------------------------------------------------- remote and locks
def set_remote(root: Path, url: str, endpoint: str | None = None) -> None:
    """This machine's default remote `alignflow` (in .dvc/config.local, out of git); credentials stay in the
    environment / AWS profile. Without one the project's committed default remote is used."""
    if not (root / ".dvc").is_dir():
        return
    from dvc.config import Config
    with Config(str(root / ".dvc")).edit("local") as conf:
        conf["remote"]["alignflow"] = {"url": url, **({"endpointurl": endpoint} if endpoint else {})}
        conf["core"]["remote"] = "alignflow"


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
        recover_rwlock(self.path.parent.parent)
        return self

    def __exit__(self, *exc):
        import fcntl
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def recover_rwlock(root: Path) -> bool:
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
