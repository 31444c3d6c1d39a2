import random

import numpy as np
import torch

from alignflow import checkpoint
from alignflow.data.task import generate, worked_steps
from alignflow.config import RewardSpec
from alignflow.rewards import RewardSet, accuracy_reward, steps_consistent


def test_worked_steps_by_hand():
    assert worked_steps(47, 85) == "7+5=12;4+8+1=13;A:132"
    assert worked_steps(7, 85) == "7+5=12;0+8+1=9;A:92"


def test_rewards():
    assert accuracy_reward(["47+85=?"] * 3, ["7+5=12;4+8+1=13;A:132", "A:131", "garbage"], answer=["132"] * 3) == [1, 0, 0]
    # a right answer with wrong steps is accurate but not steps-consistent
    assert steps_consistent(["22+13=?", "22+13=?"], ["2+3=5;2+1=3;A:35", "2+3=5;1+1=2;A:35"]) == [1.0, 0.0]


def test_reward_exception_is_a_per_sample_error(tmp_path):
    (tmp_path / "flaky.py").write_text(
        "def flaky(prompts, completions, **kw):\n"
        "    if any('boom' in c for c in completions):\n"
        "        raise ValueError('boom')\n"
        "    return [1.0] * len(completions)\n")
    result = RewardSet([RewardSpec(function="flaky.py:flaky")], tmp_path)(["a", "b", "c"], ["ok", "boom", "ok"], {})
    assert result.total == [1.0, 0.0, 1.0] and result.per_function["flaky"] == [1.0, None, 1.0]
    assert result.errors == {"flaky": 1}


def test_splits_are_disjoint_and_seeded():
    a, b = generate(seed=3, n_corpus=100), generate(seed=3, n_corpus=100)
    assert a == b
    held = {r["prompt"] for s in ("eval", "ood", "logged") for r in a[s]}
    train = {r["prompt"] for s in ("sft", "rl") for r in a[s]}
    assert not held & train
    assert all(r["response"] is None for r in a["real"]) and all("+" not in r["prompt"] or " " in r["prompt"] for r in a["real"])
    ood = [tuple(map(int, r["prompt"][:-2].split("+"))) for r in a["ood"]]
    assert ood and all(50 <= x <= 99 and 50 <= y <= 99 for x, y in ood)  # the harder tail: every sum carries
    operands = [int(x) for r in a["sft"] for x in r["prompt"][:-2].split("+")]
    assert sum(x < 10 for x in operands) / len(operands) < 0.25  # uniform operands, not a quarter 1-digit sums


def test_checkpoint_roundtrip_restores_rng_and_optimizer(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    random.seed(1); np.random.seed(1); torch.manual_seed(1)
    checkpoint.save(tmp_path, 7, model, opt, extra={"pos": torch.tensor(5)})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    state = checkpoint.load_latest(tmp_path, fresh, fresh_opt)
    assert state["step"] == 7 and int(state["extra"]["pos"]) == 5
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    assert not list(tmp_path.glob(".tmp-*"))
