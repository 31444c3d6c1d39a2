"""Config errors name the key path and what is allowed, before any work starts."""
import copy

import pytest
import yaml

from alignflow.config import ConfigError, load_project, parse_project
from tests.conftest import REPO

RAW = yaml.safe_load((REPO / "pipelines.yaml").read_text())


def with_change(path: str, value):
    """pipelines.yaml with one key set (values parsed as YAML, as `-S key=value` is)."""
    raw = copy.deepcopy(RAW)
    node, parts = raw, path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(str(value))
    return raw


def test_repo_config_is_valid():
    project = load_project(REPO / "pipelines.yaml")
    assert "tiny" in project.pipelines and project.tracked == ["tiny"]
    assert len(project.pipelines["tiny"].candidate_names()) >= 4  # the backbone issue: >= 2 seeds x 2 checkpoints


@pytest.mark.parametrize("path,value,message", [
    ("pipelines.tiny.sft.learning_rate", "0.1", "pipelines.tiny.sft.learning_rate: unknown key"),
    ("pipelines.tiny.sft.lr", "-1", "pipelines.tiny.sft.lr: got -1"),
    ("pipelines.tiny.sft.steps", "many", "pipelines.tiny.sft.steps"),
    ("pipelines.tiny.rl.group_size", "1", "pipelines.tiny.rl.group_size: got 1; input should be greater than or equal to 2"),
    ("pipelines.tiny.ope.top_k", "50", "ope.top_k = 50 exceeds the number of candidates (7)"),
    ("pipelines.tiny.ope.select.rule", "best", "pipelines.tiny.ope.select.rule: got 'best'; allowed: 'estimate' or 'lower_bound'"),
    ("tracked", "[nope]", "tracked names unknown pipelines ['nope']"),
])
def test_bad_values_name_the_key(path, value, message):
    with pytest.raises(ConfigError) as err:
        parse_project(with_change(path, value))
    assert message in str(err.value)


def test_unknown_algorithm_lists_registered():
    raw = copy.deepcopy(RAW)
    raw["pipelines"]["tiny"]["rl"]["candidates"][0]["algorithm"] = "ppo2"
    with pytest.raises(ConfigError, match=r"rl.candidates.0.algorithm: unknown algorithm 'ppo2'; allowed: \["):
        parse_project(raw)
