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
    assert p["sft"]["eval_score"] >= p["base"]["eval_score"] + 0.20
    assert p[champion]["eval_score"] >= p["sft"]["eval_score"] + 0.10
    assert p["sft"]["ood_score"] >= 0.10
    assert p[champion]["ood_score"] >= p["sft"]["ood_score"]
    assert 0.0 < max(v["real_score"] for v in p.values()) < 1.0
