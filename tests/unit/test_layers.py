"""The architecture, checked from the source: dvc.yaml is the stage table's (deps cover each stage's code closure,
outs and metrics are the Layout's paths), the layers hold (Prefect, MLflow, DVC, flows and tasks stay out of the
core), and no import circles."""
import subprocess
import sys

import pytest
import yaml

from alignflow import codegraph, versioning
from alignflow.layout import Layout
from alignflow.stage import STAGES
from tests.conftest import REPO

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
CORE = sorted(p for p in (REPO / "alignflow").rglob("*.py") if "__pycache__" not in p.parts)
# The only modules of the core allowed to import what the core must not need: MLflow in tracking.py, DVC in
# versioning.py, the CLI (it starts flows) and the ops part (servers, workers, deployments).
OUTER = {"mlflow": {"alignflow/tracking.py"}, "dvc": {"alignflow/versioning.py"},
         "prefect": {"alignflow/infra.py"}, "flows": {"alignflow/cli.py", "alignflow/infra.py"},
         "tasks": set()}


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_dvc_yaml_is_generated_from_the_stage_table():
    assert (REPO / "dvc.yaml").read_text() == versioning.render_dvc_yaml(REPO, STAGES), "run `alignflow dvc-yaml`"
    assert list(DVC_YAML) == ["external", *STAGES]


@pytest.mark.parametrize("name", list(STAGES))
def test_deps_cover_the_stage_code_closure(name):
    """Every project file the stage's flow and step import (at any depth, lazily or not) is a dep: a change to
    it re-runs the stage. Computed here from the source, independently of how dvc.yaml was written."""
    spec = STAGES[name]
    module = codegraph.module_file(REPO, spec.run.partition(":")[0])
    reached = codegraph.closure(REPO, [REPO / "flows/stages.py", module], skip_strings_in=(REPO / "alignflow/stage.py",))
    deps = DVC_YAML[name]["do"]["deps"]
    missing = sorted(p.relative_to(REPO).as_posix() for p in reached if not covered(p.relative_to(REPO).as_posix(), deps))
    assert not missing, f"{name}: dvc.yaml deps miss {missing}"
    for rel in ("alignflow/stage.py", "alignflow/config.py", "tasks/common.py", module.relative_to(REPO).as_posix()):
        assert covered(rel, deps), (name, rel)


def test_closure_follows_lazy_imports_and_registry_strings(tmp_path):
    """The closure is not just the module-level imports: an import inside a function and a "module:function"
    string both count (a missed one would let DVC skip a stage whose code changed)."""
    pkg = tmp_path / "alignflow"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from alignflow import b\n")
    (pkg / "b.py").write_text("NAME = 'alignflow.c:fn'\n")
    (pkg / "c.py").write_text("import os\n")
    (pkg / "d.py").write_text("")
    reached = {p.name for p in codegraph.closure(tmp_path, [pkg / "a.py"])}
    assert reached == {"__init__.py", "a.py", "b.py", "c.py"}


@pytest.mark.parametrize("name", list(STAGES))
def test_outs_metrics_and_params_are_the_tables(name):
    spec, do = STAGES[name], DVC_YAML[name]["do"]
    layout = Layout(REPO, "${item}")
    assert do["cmd"] == f"alignflow stage {name} --pipeline ${{item}}"
    assert do["outs"] == [layout.rel(getattr(layout, attr)) for attr in spec.outs]
    assert list(do["metrics"][0]) == [layout.rel(layout.metrics_file(name))]
    assert [list(p)[0] for p in do.get("plots", [])] == [layout.rel(layout.plot_file(p)) for p in spec.plots]
    for attr in spec.inputs:
        assert layout.rel(getattr(layout, attr)) in do["deps"], (name, attr)
    assert (layout.rel(layout.external_fingerprint) in do["deps"]) == spec.external
    assert do["params"][0]["pipelines.yaml"] == [f"pipelines.${{item}}.{k}" for k in spec.params]
    if spec.curve:
        assert spec.curve in spec.plots


def test_every_param_dvc_reads_exists_for_every_pipeline():
    """DVC fails a stage whose params key is missing from pipelines.yaml (pydantic defaults don't count)."""
    raw = yaml.safe_load((REPO / "pipelines.yaml").read_text())
    for name, pipeline in raw["pipelines"].items():
        for stage in DVC_YAML.values():
            for key in stage["do"].get("params", [{"pipelines.yaml": []}])[0]["pipelines.yaml"]:
                node = raw
                for part in key.replace("${item}", name).split("."):
                    assert isinstance(node, dict) and part in node, f"{key} missing for pipeline {name!r}"
                    node = node[part]


def test_core_imports_stay_inside_their_layer():
    """Read from the source, every import anywhere in the file (a lazy `import mlflow` in a function counts)."""
    bad = []
    for path in CORE + sorted((REPO / "flows").glob("*.py")) + sorted((REPO / "tasks").glob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        names = {n.split(".")[0] for n in codegraph.imported_names(path, REPO, strings=False)}
        for package, allowed in OUTER.items():
            if package in names and rel not in allowed and not (
                    package in ("prefect", "flows", "tasks") and rel.split("/")[0] in ("flows", "tasks")):
                bad.append(f"{rel} imports {package}")
    assert not bad, bad


def test_core_imports_with_prefect_mlflow_dvc_flows_and_tasks_missing():
    """Every core module imports in a process where those packages cannot be imported at all (a GPU box
    with only torch + transformers), the outer modules excepted."""
    outer = set().union(*OUTER.values())
    modules = [codegraph.module_name(REPO, p) for p in CORE if p.relative_to(REPO).as_posix() not in outer
               and not p.name.startswith("vllm_")]  # vllm_worker / vllm_ext run inside vLLM's own environment
    code = ("import sys\n"
            "for name in ('prefect', 'mlflow', 'dvc', 'flows', 'tasks'):\n    sys.modules[name] = None\n"
            "import importlib\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            "print('ok', len(sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={"ALIGNFLOW_TRACKING": "file", "PATH": "/usr/bin:/bin", "HOME": str(REPO)})
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]


@pytest.mark.parametrize("module_level_only", [True, False], ids=["on-import", "with-lazy-imports"])
def test_no_import_circles(module_level_only):
    assert codegraph.cycles(REPO, CORE, module_level_only=module_level_only) == []


def test_cycle_finder_finds_a_planted_circle(tmp_path):
    pkg = tmp_path / "alignflow"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from alignflow import b\n")
    (pkg / "b.py").write_text("def f():\n    from alignflow.a import x\n")
    files = sorted(pkg.glob("*.py"))
    assert codegraph.cycles(tmp_path, files) == []
    assert codegraph.cycles(tmp_path, files, module_level_only=False) == [["alignflow.a", "alignflow.b", "alignflow.a"]]
