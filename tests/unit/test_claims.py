"""bench/claims.py's maths: t quantiles, intervals, the verdict rule, the paired bootstrap, and the changed-set
figures (share per matrix, Jaccard, chance level, gradient mask), each against a plain loop written here."""
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import stats  # noqa: E402
import subnetwork  # noqa: E402


def _t_cdf_by_integration(t: float, df: float, n: int = 200_000) -> float:
    """P(T <= t) by the midpoint rule on the t density from 0 to |t|."""
    const = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    h = abs(t) / n
    area = sum(const * (1 + ((i + 0.5) * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n)) * h
    return 0.5 + math.copysign(area, t)


@pytest.mark.parametrize("df", [1, 2, 3.3, 4, 9.7, 30])
def test_t_ppf_inverts_the_integrated_density(df):
    q = stats.t_ppf(0.975, df)
    assert _t_cdf_by_integration(q, df) == pytest.approx(0.975, abs=2e-6)
    assert stats.t_ppf(0.025, df) == pytest.approx(-q)


def test_t_ppf_table_values():
    # printed tables: t_{0.975}(2) = 4.303, t_{0.975}(4) = 2.776, t_{0.975}(30) = 2.042, t_{0.975}(1) = 12.706
    for df, want in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (30, 2.0423)):
        assert stats.t_ppf(0.975, df) == pytest.approx(want, abs=1e-4)


def _loop_mean_sd(xs):
    m = 0.0
    for x in xs:
        m += x
    m /= len(xs)
    ss = 0.0
    for x in xs:
        ss += (x - m) ** 2
    return m, math.sqrt(ss / (len(xs) - 1))


def test_mean_ci_and_vs_constant():
    xs = [0.71, 0.74, 0.80]
    m, sd = _loop_mean_sd(xs)
    mean, half = stats.mean_ci(xs)
    assert mean == pytest.approx(m) and half == pytest.approx(4.302652729911275 * sd / math.sqrt(3))
    d = stats.diff_vs_constant(xs, 0.70)
    assert d["diff"] == pytest.approx(m - 0.70)
    assert d["lo"] == pytest.approx(m - 0.70 - half) and d["hi"] == pytest.approx(m - 0.70 + half)
    assert math.isnan(stats.mean_ci([0.5])[1])


def test_welch_by_hand():
    a, b = [0.80, 0.82, 0.79], [0.70, 0.75, 0.71, 0.74]
    (ma, sa), (mb, sb) = _loop_mean_sd(a), _loop_mean_sd(b)
    va, vb = sa ** 2 / 3, sb ** 2 / 4
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    got = stats.welch_diff(a, b)
    assert got["df"] == pytest.approx(df)
    half = stats.t_ppf(0.975, df) * math.sqrt(va + vb)
    assert got["diff"] == pytest.approx(ma - mb)
    assert got["lo"] == pytest.approx(ma - mb - half) and got["hi"] == pytest.approx(ma - mb + half)
    same = stats.welch_diff([0.5, 0.5], [0.5, 0.5])
    assert same["lo"] == same["hi"] == 0.0


def test_paired_bootstrap_matches_a_loop():
    rng = random.Random(1)
    a = [[rng.random() < 0.7 for _ in range(60)] for _ in range(3)]
    b = [[rng.random() < 0.6 for _ in range(60)]]
    got = stats.paired_bootstrap(a, b, n_boot=500, seed=3)
    per_prompt = [sum(a[s][i] for s in range(3)) / 3 - b[0][i] for i in range(60)]
    assert got["diff"] == pytest.approx(sum(per_prompt) / 60)
    # the same resamples drawn in a loop
    draws = np.random.default_rng(3).integers(0, 60, size=(500, 60))
    means = sorted(sum(per_prompt[j] for j in row) / 60 for row in draws)
    assert got["lo"] == pytest.approx(np.quantile(means, 0.025)) and got["hi"] == pytest.approx(np.quantile(means, 0.975))
    assert got["lo"] < got["diff"] < got["hi"]


@pytest.mark.parametrize("lo,hi,direction,want", [
    (0.01, 0.05, "greater", "holds"),
    (-0.05, -0.01, "greater", "does not hold"),        # excludes 0 the other way
    (-0.02, 0.005, "greater", "does not hold"),        # upper bound below the practical margin (0.01)
    (-0.02, 0.04, "greater", "inconclusive"),
    (-0.005, 0.03, "not_worse", "holds"),              # lower bound above -margin
    (-0.08, -0.02, "not_worse", "does not hold"),      # upper bound below -margin
    (-0.05, 0.01, "not_worse", "inconclusive"),
    (float("nan"), float("nan"), "greater", "inconclusive"),
])
def test_verdict_rule(lo, hi, direction, want):
    assert stats.verdict(lo, hi, direction, margin=0.01) == want


def test_verdict_rejects_unknown_direction():
    with pytest.raises(ValueError):
        stats.verdict(0.0, 1.0, "less")


class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(5, 7))
        self.b = torch.nn.Parameter(torch.randn(11))


def test_changed_shares_per_matrix_and_packed_set_by_loop():
    torch.manual_seed(0)
    model = _Two()
    start = subnetwork.snapshot(model)
    with torch.no_grad():
        model.a[0, :3] += 1.0          # beyond bf16 rounding
        model.a[1, 0] += 1e-7          # an fp32 change below bf16 rounding (and below 1e-5)
        model.b[4] -= 0.5
    figures, packed = subnetwork.changed(start, model)
    flags = []
    for name in ("a", "b"):
        before, after = start[name].flatten().tolist(), getattr(model, name).detach().flatten().tolist()
        mine = [torch.tensor(x).bfloat16().item() != torch.tensor(y).bfloat16().item() for x, y in zip(before, after)]
        assert figures["per_matrix"][name] == pytest.approx(sum(mine) / len(mine))
        flags += mine
    assert figures["changed_share"] == pytest.approx(sum(flags) / len(flags))
    assert figures["parameters"] == 46
    assert np.unpackbits(packed)[:46].astype(bool).tolist() == flags
    assert figures["fp32_changed_share"] >= figures["changed_share"]
    assert figures["abs_gt_1e-5_share"] == pytest.approx(4 / 46)


def test_jaccard_and_chance_by_loop():
    rng = random.Random(0)
    x = [rng.random() < 0.3 for _ in range(1003)]
    y = [rng.random() < 0.5 for _ in range(1003)]
    inter = sum(1 for i, j in zip(x, y) if i and j)
    union = sum(1 for i, j in zip(x, y) if i or j)
    px, py = np.packbits(np.array(x)), np.packbits(np.array(y))
    assert subnetwork.popcount(px) == sum(x)
    assert subnetwork.jaccard(px, py) == pytest.approx(inter / union)
    assert subnetwork.jaccard(np.packbits(np.zeros(9, bool)), np.packbits(np.zeros(9, bool))) == 1.0
    # chance: E|A&B| / E|A|B| for independent sets of densities p, q
    p, q = 0.3, 0.5
    assert subnetwork.chance_jaccard(p, q) == pytest.approx((p * q) / (p + q - p * q))


def test_grad_mask_trains_only_the_set():
    torch.manual_seed(0)
    model = _Two()
    keep = np.zeros(46, bool)
    keep[[0, 3, 40]] = True
    start = subnetwork.snapshot(model)
    assert subnetwork.apply_grad_mask(model, np.packbits(keep)) == 3
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        opt.zero_grad()
        ((model.a ** 2).sum() + (model.b ** 3).sum()).backward()
        opt.step()
    moved = torch.cat([(getattr(model, n).detach() != start[n]).flatten() for n in ("a", "b")]).numpy()
    assert moved.tolist() == keep.tolist()


def test_grad_mask_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError):
        subnetwork.apply_grad_mask(_Two(), np.packbits(np.ones(80, bool)))


def test_srppo_verifier_weight_adds_the_standardised_verifier_reward():
    """srppo_verifier (claims a): implicit-reward advantage + w x the group-standardised verifier reward."""
    from alignflow.algorithms import ADVANTAGES, RolloutBatch
    mask = torch.ones(4, 2)
    ref = torch.tensor([[-1.0, -1.0], [-2.0, -1.0], [-1.0, -3.0], [-1.0, -1.0]])
    b = RolloutBatch(input_ids=torch.zeros(4, 3, dtype=torch.long), attention_mask=torch.ones(4, 3),
                     completion_mask=mask, rewards=torch.tensor([1.0, 0.0, 0.0, 0.0]),
                     group_ids=torch.tensor([0, 0, 1, 1]), old_logprobs=torch.zeros(4, 2),
                     rollout_logprobs=torch.zeros(4, 2), ref_logprobs=ref, base_logprobs=torch.zeros(4, 2))
    hp = {"length_normalise": 0.0, "adv_eps": 0.0}
    plain = ADVANTAGES["implicit_reward_group"](b, hp | {"verifier_weight": 0.0})[:, 0]
    with_verifier = ADVANTAGES["implicit_reward_group"](b, hp | {"verifier_weight": 0.5})[:, 0]
    # implicit rewards -2, -3 | -4, -2: per group +-1/sqrt(2); verifier 1, 0 | 0, 0: +-1/sqrt(2) in group 0, 0 in group 1
    s = 1 / math.sqrt(2)
    assert torch.allclose(plain, torch.tensor([s, -s, -s, s]), atol=1e-6)
    assert torch.allclose(with_verifier, plain + 0.5 * torch.tensor([s, -s, 0.0, 0.0]), atol=1e-6)


def _run(method, seed, eval_acc, correct):
    return {"method": method, "seed": seed, "eval_accuracy": eval_acc, "eval_correct": correct}


def test_compare_one_sample_against_sft_and_welch_between_methods():
    import claims
    out = {"sft": {"eval_accuracy": 0.5, "eval_correct": "1100"},
           "runs": [_run("x", 0, 0.75, "1110"), _run("x", 1, 0.75, "1101"), _run("x", 2, 1.0, "1111"),
                    _run("y", 0, 0.5, "1100"), _run("y", 1, 0.25, "1000")]}
    vs_sft = claims.compare(out, "x", "sft", "eval_accuracy")
    want = stats.diff_vs_constant([0.75, 0.75, 1.0], 0.5)
    assert vs_sft["t_interval"] == [want["lo"], want["hi"]] and vs_sft["seeds_a"] == [0, 1, 2]
    assert vs_sft["verdict"] == stats.verdict(want["lo"], want["hi"])
    # per prompt: x's mean over seeds 1, 1, 2/3, 2/3; sft 1, 1, 0, 0 -> mean difference 1/3
    assert vs_sft["bootstrap_prompts"] == 4
    between = claims.compare(out, "x", "y", "eval_accuracy", "not_worse")
    want = stats.welch_diff([0.75, 0.75, 1.0], [0.5, 0.25])
    assert between["t_interval"] == [want["lo"], want["hi"]] and between["diff"] == pytest.approx(0.45833333)
    assert claims.compare(out, "z", "sft", "eval_accuracy")["verdict"] == "not run"
    assert claims.compare(out, "x", "teacher", "eval_accuracy")["verdict"] == "not run"
