"""GRPO's advantage, loss and aggregation against values computed by hand; the registry's contract."""
import math

import pytest
import torch

from alignflow.algorithms import ADVANTAGES, ALGORITHMS, LOSS_AGGS, POLICY_LOSSES, Algorithm, RolloutBatch
from alignflow.algorithms.core import Registry, k3_kl, register_algorithm


def batch(rewards, groups, T=3, old=None, rollout=None):
    B = len(rewards)
    old = torch.zeros(B, T) if old is None else old
    return RolloutBatch(input_ids=torch.zeros(B, T + 2, dtype=torch.long), attention_mask=torch.ones(B, T + 2),
                        completion_mask=torch.ones(B, T), rewards=torch.tensor(rewards, dtype=torch.float),
                        group_ids=torch.tensor(groups), old_logprobs=old,
                        rollout_logprobs=old.clone() if rollout is None else rollout)


def test_grpo_advantage_by_hand():
    # group 0: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3); group 1: all zero -> advantage 0
    b = batch([1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 1])
    adv = ADVANTAGES["group_std"](b, {"adv_eps": 0.0})
    expected = 0.5 / math.sqrt(1 / 3)
    assert adv.shape == (6, 3)
    assert torch.allclose(adv[:, 0], torch.tensor([expected, -expected, -expected, expected, 0, 0]), atol=1e-6)
    assert torch.all(adv == adv[:, :1])  # same for every token


def test_clipped_ratio_by_hand():
    # ratio e^{0.5}=1.6487 with A=+1 is clipped to 1.2; ratio e^{-0.5}=0.6065 with A=-1 is clipped to 0.8
    old = torch.zeros(2, 1)
    logp = torch.tensor([[0.5], [-0.5]])
    b = batch([1, 0], [0, 0], T=1, old=old)
    adv = torch.tensor([[1.0], [-1.0]])
    loss, metrics = POLICY_LOSSES["clipped_ratio"](logp, b, adv, {"clip_eps": 0.2})
    # min(r*A, clip(r)*A): row0 min(1.6487, 1.2) = 1.2 -> loss -1.2; row1 min(-0.6065, -0.8) = -0.8 -> loss 0.8
    assert torch.allclose(loss, torch.tensor([[-1.2], [0.8]]), atol=1e-5)
    assert metrics["clip_frac"] == 1.0


def test_truncated_importance_sampling_caps_at_c():
    old = torch.tensor([[0.0, 0.0]])
    rollout = torch.tensor([[-2.0, 0.5]])  # pi_old / pi_rollout = e^2 (capped to 2) and e^-0.5
    b = batch([1], [0], T=2, old=old, rollout=rollout)
    loss, _ = POLICY_LOSSES["clipped_ratio"](old.clone(), b, torch.ones(1, 2), {"clip_eps": 0.2, "tis_cap": 2.0})
    assert torch.allclose(loss, torch.tensor([[-2.0, -math.exp(-0.5)]]), atol=1e-6)


def test_k3_kl_by_hand():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    r = math.exp(-1.0)  # ref/pi
    assert torch.allclose(k3_kl(logp, ref), torch.tensor([r - math.log(r) - 1]))
    assert k3_kl(ref, ref).item() == 0.0


def test_loss_aggregations_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert LOSS_AGGS["seq_mean_token_mean"](loss, mask, {}).item() == pytest.approx((2.0 + 4.0) / 2)
    assert LOSS_AGGS["token_mean"](loss, mask, {}).item() == pytest.approx(10.0 / 4)
    assert LOSS_AGGS["token_sum_norm"](loss, mask, {}).item() == pytest.approx(10.0 / 6)


def test_registry_rejects_duplicates_and_lists_valid_names():
    reg = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(KeyError, match="already registered"):
        reg.register("a")(2)
    with pytest.raises(KeyError, match=r"registered: \['a'\]"):
        reg["b"]


def test_preset_must_name_registered_pieces():
    with pytest.raises(KeyError, match="unknown advantage"):
        register_algorithm(Algorithm(name="bogus", summary="", advantage="nope", policy_loss="clipped_ratio",
                                     loss_agg="token_mean"))


def test_unknown_hparam_names_allowed_ones():
    with pytest.raises(ValueError, match="allowed: .*clip_eps"):
        ALGORITHMS["grpo"].hparams({"clip_epsilon": 0.1})


def test_grpo_step_changes_every_parameter():
    """A few real updates of a tiny model: finite loss and every parameter moves (TRL's per-loss check)."""
    from alignflow.config import CandidateConfig, RLConfig, TinyModelConfig
    from alignflow.models import build_tiny_model, build_tokenizer
    from alignflow.train.rl import train_candidate
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_tiny_model(tok, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                                  intermediate_size=64))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logs = []
    # a reward that varies within groups regardless of correctness, so advantages are non-zero
    def length_reward(prompts, completions, **kw):
        return [float(len(c) % 2) for c in completions]
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        train_candidate(model, tok, CandidateConfig(name="t", steps=3, checkpoints=[3], lr=1e-2, seeds=[0]), 0,
                        RLConfig(prompts_per_step=4, group_size=4, max_new_tokens=8), ["1+2=?", "3+4=?"], ["3", "7"],
                        Path(tmp), on_log=lambda s, m: logs.append(m), reward_fn=length_reward)
    assert all(math.isfinite(m["loss"]) for m in logs)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"parameters not updated: {unchanged}"


# ---------------------------------------------------------------- registry and batch surgery, edge cases
def test_registry_returns_what_was_registered_and_knows_membership():
    reg = Registry("thing")
    assert reg.register("a")(1) == 1 and reg["a"] == 1
    assert "a" in reg and "b" not in reg


def test_register_algorithm_rejects_unknown_needs_and_registers(monkeypatch):
    from alignflow.algorithms import core
    monkeypatch.setattr(core.ALGORITHMS, "_items", dict(core.ALGORITHMS._items))   # leave the real registry alone
    with pytest.raises(KeyError, match=r"needs unknown inputs \['telepathy'\]; known: \['base', "):
        register_algorithm(Algorithm(name="x1", summary="", advantage="group_std", policy_loss="clipped_ratio",
                                     loss_agg="token_mean", needs=("verifier", "telepathy")))
    algo = Algorithm(name="x2", summary="", advantage="group_std", policy_loss="clipped_ratio", loss_agg="token_mean",
                     needs=("verifier",))
    assert register_algorithm(algo) is algo and core.ALGORITHMS["x2"] is algo


def test_inputs_add_ref_only_for_a_positive_beta():
    assert ALGORITHMS["grpo"].inputs() == {"verifier"}
    assert ALGORITHMS["opmd"].inputs() == {"verifier"}              # no beta among its constants at all
    assert ALGORITHMS["grpo"].inputs({"beta": 0.0}) == {"verifier"}


def test_group_stats_keeps_the_values_dtype():
    from alignflow.algorithms.core import group_stats
    mean, std = group_stats(torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64), torch.tensor([0, 0, 1]))
    assert mean.dtype == std.dtype == torch.float64 and mean.tolist() == [0.5, 0.5, 0.5]


def test_tis_cap_is_the_hparam():
    old, rollout = torch.tensor([[0.0]]), torch.tensor([[-2.0]])
    b = batch([1], [0], T=1, old=old, rollout=rollout)
    loss, _ = POLICY_LOSSES["clipped_ratio"](old.clone(), b, torch.ones(1, 1), {"clip_eps": 0.2, "tis_cap": 1.5})
    assert loss.item() == pytest.approx(-1.5)


def test_kl_metric_and_clip_fraction_count_generated_tokens_only():
    old = torch.zeros(2, 2)
    b = batch([1, 0], [0, 0], T=2, old=old)
    b.completion_mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    b.ref_logprobs = torch.tensor([[-1.0, 0.0], [0.0, -5.0]])            # KL only where logp != ref
    logp = torch.tensor([[0.0, 0.0], [0.0, 0.5]])                         # the padded token: ratio e^0.5, clipped
    _, metrics = POLICY_LOSSES["clipped_ratio"](logp, b, torch.ones(2, 2), {"clip_eps": 0.2, "beta": 0.1})
    r = math.exp(-1.0)
    assert metrics["kl"] == pytest.approx((r - math.log(r) - 1) / 3) and metrics["clip_frac"] == 0.0
    from alignflow.algorithms.dcpo import dynamic_clip
    _, dcpo = dynamic_clip(logp + torch.tensor([[5.0, 0.0], [0.0, 0.0]]), b, torch.ones(2, 2),
                           {"clip_eps": 0.16, "clip_eps_high": 0.2, "clip_cap": 10.0})
    assert dcpo["clip_frac"] == pytest.approx(1 / 3)                      # the padded token's clip is not counted


def test_select_groups_keeps_expert_flags_extras_and_no_prompts():
    from alignflow.algorithms.core import select_groups
    b = batch([1, 0, 0, 1], [0, 0, 1, 1])
    b.is_expert, b.extras = torch.tensor([False, False, True, True]), {"k": 1}
    kept = select_groups(b, [1])
    assert kept.is_expert.tolist() == [True, True] and kept.extras == {"k": 1} and kept.prompts == []
    b.ref_logprobs = torch.zeros(4, 3)
    with pytest.raises(AssertionError, match="^select groups before filling extra inputs$"):
        select_groups(b, [0])


def test_concat_pads_with_the_pad_id_zero_masks_and_expert_flags():
    from alignflow.algorithms.core import concat_batches
    a = batch([1, 0], [0, 0], T=2, old=torch.full((2, 2), -1.0))
    c = batch([1], [0], T=3, old=torch.full((1, 3), -2.0))
    a.input_ids = torch.ones(2, 4, dtype=torch.long)                      # prompt 2 + completion 2
    c.input_ids = torch.full((1, 5), 2, dtype=torch.long)                 # prompt 2 + completion 3
    c.is_expert = torch.tensor([True])
    out = concat_batches([a, c], pad_id=99)
    assert out.input_ids[0].tolist() == [1, 1, 1, 1, 99]                  # completions right-padded with pad_id
    assert out.completion_mask[0].tolist() == [1, 1, 0] and out.old_logprobs[0].tolist() == [-1, -1, 0]
    assert out.rollout_logprobs[0].tolist() == [-1, -1, 0] and out.attention_mask[0].tolist() == [1, 1, 1, 1, 0]
    assert out.is_expert.tolist() == [False, False, True] and out.is_expert.dtype == torch.bool
    assert concat_batches([a, a], pad_id=99).is_expert is None
    a.entropy = torch.zeros(2, 2)
    with pytest.raises(AssertionError, match="^concat before filling extra inputs$"):
        concat_batches([a, c], pad_id=99)


def test_reward_history_with_fractional_rewards_and_two_samples():
    from alignflow.algorithms import RewardHistory
    history = RewardHistory()
    times, mean, std = history.update(["p"], torch.tensor([1.0, 0.5]), torch.tensor([0, 0]))
    assert times.tolist() == [1, 1] and mean.tolist() == [0.75, 0.75]
    assert std[0].item() == pytest.approx(math.sqrt(0.125))               # unbiased: ((.25)^2 * 2) / (2 - 1)
    assert history.state_dict()["stats"].dtype == torch.float64


def test_aggregations_divide_by_the_given_batch_counts():
    """Under DDP the counts are the global batch's: the aggregation divides this rank's sums by them."""
    from alignflow.algorithms.core import BatchCounts
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    counts = BatchCounts(rows=5, tokens=10.0, width=4)
    assert LOSS_AGGS["seq_mean_token_mean"](loss, mask, {}, counts).item() == pytest.approx((2.0 + 4.0) / 5)
    assert LOSS_AGGS["token_mean"](loss, mask, {}, counts).item() == pytest.approx(10.0 / 10)
    assert LOSS_AGGS["token_sum_norm"](loss, mask, {}, counts).item() == pytest.approx(10.0 / 20)
    assert LOSS_AGGS["token_mean"](loss * 0, mask * 0, {}).item() == 0.0          # no tokens: no division by 0
