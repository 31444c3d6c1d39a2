"""dvc.yaml and alignflow/layout.py declare the same paths; every stage has its flow, every flow its stage."""
import yaml

from alignflow.layout import Layout
from flows import STAGES
from tests.conftest import REPO


def test_dvc_yaml_matches_layout():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["external", *STAGES]  # external: what pipelines.yaml names outside DVC's view
    layout = Layout(REPO, "${item}")
    external = stages["external"]["do"]
    assert external["cmd"] == "alignflow fingerprint --pipeline ${item}" and external["always_changed"] is True
    assert external["outs"] == [{layout.rel(layout.external_fingerprint): {"cache": False}}]
    for name in ("base", "teacher", "sft", "rl", "logged", "evaluate"):  # the stages that read external inputs
        assert layout.rel(layout.external_fingerprint) in stages[name]["do"]["deps"], name
    expected_outs = {"curate": layout.curated, "base": layout.base, "sft": layout.sft, "teacher": layout.teacher, "rl": layout.rl,
                     "logged": layout.logged, "ope": layout.ope}
    for name, path in expected_outs.items():
        assert stages[name]["do"]["outs"] == [layout.rel(path)], name
    for name in STAGES:
        do = stages[name]["do"]
        assert do["cmd"] == f"alignflow stage {name} --pipeline ${{item}}"
        assert f"flows/{name}.py" in do["deps"]
        assert (REPO / "flows" / f"{name}.py").exists()
        metric = list(do["metrics"][0])[0]
        assert metric == f"{layout.rel(layout.metrics)}/{name}.json"


def test_every_param_dvc_reads_exists_for_every_pipeline():
    """DVC fails a stage whose params key is missing from pipelines.yaml (pydantic defaults don't count)."""
    raw = yaml.safe_load((REPO / "pipelines.yaml").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, pipeline in raw["pipelines"].items():
        for stage in stages.values():
            for key in stage["do"].get("params", [{"pipelines.yaml": []}])[0]["pipelines.yaml"]:
                node = raw
                for part in key.replace("${item}", name).split("."):
                    assert isinstance(node, dict) and part in node, f"{key} missing for pipeline {name!r}"
                    node = node[part]
