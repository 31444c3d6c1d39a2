"""The default pipeline, full size, from a fresh project: it must learn (slow: ~10 minutes on 2 cores).

    ./test.sh -m slow
"""
import json

import pytest

from tests.conftest import alignflow, make_project


@pytest.mark.slow
def test_tiny_pipeline_learns(tmp_path):
    root = make_project(tmp_path, tracked="tiny")
    alignflow(root, "run", "--pipeline", "tiny", timeout=3600)
    ev = json.loads((root / "metrics/tiny/evaluate.json").read_text())
    p, champion = ev["policies"], ev["champion"]
    assert p["sft"]["eval_accuracy"] >= p["base"]["eval_accuracy"] + 0.20
    assert p[champion]["eval_accuracy"] >= p["sft"]["eval_accuracy"] + 0.10
    assert p["sft"]["ood_accuracy"] >= 0.10
    assert p[champion]["ood_accuracy"] >= p["sft"]["ood_accuracy"]
    assert 0.0 < max(v["real_accuracy"] for v in p.values()) < 1.0
