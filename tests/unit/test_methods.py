"""Every registered advantage, policy loss and rollout hook of the method presets against values computed by hand
(or by an independent formula), then every preset trained for two steps on a tiny model."""
import copy
import math
import tempfile
from pathlib import Path

import pytest
import torch

from alignflow.algorithms import ADVANTAGES, ALGORITHMS, LOSS_AGGS, POLICY_LOSSES, ROLLOUTS, RewardHistory, RolloutBatch
from alignflow.algorithms.chord import chord_mu, phi
from alignflow.algorithms.core import concat_batches, select_groups
from alignflow.algorithms.dapo import mixed_groups
from alignflow.algorithms.dcpo import dynamic_bounds, smooth_standardised
from alignflow.algorithms.pope import GUIDE_TEMPLATE, solution_prefix
from alignflow.algorithms.srppo import implicit_reward

SQRT_HALF = math.sqrt(0.5)


def batch(rewards, groups, T=3, P=2, **fields):
    B = len(rewards)
    old = fields.pop("old_logprobs", torch.zeros(B, T))
    return RolloutBatch(input_ids=torch.arange(B * (P + T)).reshape(B, P + T) % 7 + 4,
                        attention_mask=torch.ones(B, P + T, dtype=torch.long),
                        completion_mask=fields.pop("completion_mask", torch.ones(B, T, dtype=torch.long)),
                        rewards=torch.tensor(rewards, dtype=torch.float), group_ids=torch.tensor(groups),
                        old_logprobs=old, rollout_logprobs=fields.pop("rollout_logprobs", old.clone()),
                        prompts=fields.pop("prompts", [f"p{g}" for g in sorted(set(groups))]), **fields)


# ---------------------------------------------------------------- registry
def test_exactly_the_thirteen_methods_each_with_summary_needs_and_paper():
    assert set(ALGORITHMS) == {"grpo", "dr_grpo", "dapo", "srppo", "dcpo", "opd", "exopd", "opsd", "chord", "opmd",
                               "asymre", "empg", "pope"}
    for name, algo in ALGORITHMS.items():
        assert algo.summary and algo.paper and algo.needs, name


HAND_TESTED = {
    "advantage": {"group_std", "group_mean", "asym_shift", "implicit_reward_group", "smooth_standardised", "gopd",
                  "self_distill", "entropy_modulated"},
    "policy_loss": {"clipped_ratio", "reinforce", "dynamic_clip", "chord", "opmd"},
    "loss_agg": {"seq_mean_token_mean", "token_mean", "token_sum_norm"},
    "rollout": {"plain", "dynamic_sampling", "privileged_guidance"},
}


def test_every_registered_piece_has_a_hand_computed_test():
    """group_std, clipped_ratio and the three aggregations are checked in test_algorithms.py, the rest here."""
    for kind, registry in (("advantage", ADVANTAGES), ("policy_loss", POLICY_LOSSES), ("loss_agg", LOSS_AGGS),
                           ("rollout", ROLLOUTS)):
        assert set(registry) == HAND_TESTED[kind], kind


def test_presets_name_known_inputs_and_kl_implies_ref():
    assert ALGORITHMS["grpo"].inputs({"beta": 0.1}) == {"verifier", "ref"}
    assert ALGORITHMS["srppo"].inputs() == {"ref", "base"}
    assert ALGORITHMS["opd"].inputs() == ALGORITHMS["exopd"].inputs() == {"teacher", "ref"}


# ---------------------------------------------------------------- advantages
def test_dr_grpo_mean_only_and_asymre_shift_by_hand():
    b = batch([1, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1])
    mean_only = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0])
    assert torch.allclose(ADVANTAGES["group_mean"](b, {})[:, 0], mean_only)
    assert torch.allclose(ADVANTAGES["asym_shift"](b, {"delta": 0.1})[:, 0], mean_only + 0.1)  # R - (mean - 0.1)


def test_srppo_implicit_reward_by_hand():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    ref = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -1.0, -1.0]])   # pi_SFT
    base = torch.tensor([[-2.0, -2.5, 0.0], [-2.0, -1.0, -1.5]])   # pi_base
    b = batch([0, 0], [0, 0], completion_mask=mask, ref_logprobs=ref, base_logprobs=base)
    # row 0: (-1+2) + (-2+2.5) = 1.5 (the padded token is ignored); row 1: -1 + 0 + 0.5 = -0.5
    assert torch.allclose(implicit_reward(b, {"length_normalise": 0.0}), torch.tensor([1.5, -0.5]))
    assert torch.allclose(implicit_reward(b, {"length_normalise": 1.0}), torch.tensor([1.5 / 2, -0.5 / 3]))
    adv = ADVANTAGES["implicit_reward_group"](b, {"length_normalise": 0.0, "adv_eps": 0.0})
    # mean 0.5, unbiased std sqrt(2): +-1/sqrt(2); the verifier's rewards (all 0) play no part
    assert torch.allclose(adv[:, 0], torch.tensor([SQRT_HALF, -SQRT_HALF]), atol=1e-6)


def test_sas_at_first_and_second_visit():
    history, hp = RewardHistory(), {"adv_eps": 0.0}
    # i = 1: the cumulative statistics are this step's, so SAS = GRPO's advantage
    b1 = batch([1, 1], [0, 0], prompts=["x"])
    b1.times_seen, b1.history_mean, b1.history_std = history.update(b1.prompts, b1.rewards, b1.group_ids)
    assert b1.times_seen.tolist() == [1, 1]
    assert torch.equal(ADVANTAGES["smooth_standardised"](b1, hp), torch.zeros(2, 3))     # identical rewards
    # i = 2: rewards 1, 0. This step: mean .5, std sqrt(.5) -> A_new = +-sqrt(.5).
    # All four samples 1, 1, 1, 0: mean .75, unbiased std .5 -> A_total = .5 and -1.5.
    # SA_new = SA_total = (A_new + A_total) / 2 at i = 2.
    b2 = batch([1, 0], [0, 0], prompts=["x"])
    b2.times_seen, b2.history_mean, b2.history_std = history.update(b2.prompts, b2.rewards, b2.group_ids)
    assert b2.times_seen.tolist() == [2, 2]
    assert torch.allclose(b2.history_mean, torch.tensor([0.75, 0.75]))
    assert torch.allclose(b2.history_std, torch.tensor([0.5, 0.5]))
    expected = torch.tensor([(SQRT_HALF + 0.5) / 2, (-SQRT_HALF - 1.5) / 2])
    assert torch.allclose(ADVANTAGES["smooth_standardised"](b2, hp)[:, 0], expected, atol=1e-6)


def test_sas_picks_the_smaller_magnitude_and_revives_identical_groups():
    one = torch.ones(1)
    # i = 3, A_new = 1, A_total = .1: SA_new = 2/3 + .1/3 = .7, SA_total = 1/3 + .2/3 = .4 -> .4
    sa = smooth_standardised(one, one * 0, one, one * 0.9, one, one * 3, 0.0)
    assert torch.allclose(sa, torch.tensor([0.4]))
    # identical rewards this step (std 0 -> A_new = 0) still get 1/i of the cumulative signal
    sa = smooth_standardised(one * 0, one * 0, one * 0, one * 0.75, one * 0.5, one * 2, 0.0)
    assert torch.allclose(sa, torch.tensor([-0.75]))


def test_history_survives_a_checkpoint_round_trip(tmp_path):
    history = RewardHistory()
    history.update(["a", "b"], torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0, 0, 1, 1]))
    torch.save(history.state_dict(), tmp_path / "h.pt")
    restored = RewardHistory()
    restored.load_state_dict(torch.load(tmp_path / "h.pt", weights_only=True))
    times, mean, _ = restored.update(["a"], torch.tensor([1.0, 1.0]), torch.tensor([0, 0]))
    assert times.tolist() == [2, 2] and torch.allclose(mean, torch.tensor([0.75, 0.75]))


def test_gopd_advantage_with_reward_extrapolation():
    mask = torch.tensor([[1, 1, 0]])
    teacher, ref, old = torch.full((1, 3), -1.0), torch.full((1, 3), -2.0), torch.full((1, 3), -1.5)
    b = batch([0], [0], completion_mask=mask, teacher_logprobs=teacher, ref_logprobs=ref, old_logprobs=old)
    # lam = 1.25: 1.25 (-1) + (1 - 1.25)(-2) - (-1.5) = -1.25 + .5 + 1.5 = .75; 0 on padding
    assert torch.allclose(ADVANTAGES["gopd"](b, {"reward_scale": 1.25}), torch.tensor([[0.75, 0.75, 0.0]]))
    # lam = 1 (OPD): log pi_T - log pi_theta = .5, the negative per-token reverse KL
    assert torch.allclose(ADVANTAGES["gopd"](b, {"reward_scale": 1.0}), torch.tensor([[0.5, 0.5, 0.0]]))
    assert ALGORITHMS["exopd"].defaults["reward_scale"] == 1.25 and ALGORITHMS["opd"].defaults["reward_scale"] == 1.0


def test_opsd_reverse_kl_as_published_and_hybrid():
    old, priv = torch.full((2, 3), -1.0), torch.full((2, 3), -0.5)
    b = batch([1, 0], [0, 0], old_logprobs=old, privileged_logprobs=priv)
    published = ADVANTAGES["self_distill"](b, {"distill_coef": 1.0, "task_weight": 0.0, "adv_eps": 0.0})
    assert torch.allclose(published, torch.full((2, 3), 0.5))           # -(log pi_s - log pi_teacher) = .5
    hybrid = ADVANTAGES["self_distill"](b, {"distill_coef": 0.1, "task_weight": 1.0, "adv_eps": 0.0})
    assert torch.allclose(hybrid[:, 0], torch.tensor([SQRT_HALF + 0.05, -SQRT_HALF + 0.05]), atol=1e-6)


def test_empg_modulation_by_hand_with_no_bonus_on_the_last_step():
    # row 0: two steps with entropies 1 and 3; row 1: one step with entropy 2
    entropy = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 2.0, 2.0]])
    step_ids = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])
    b = batch([1, 0], [0, 0], T=4, entropy=entropy, step_ids=step_ids)
    hp = {"k": 1.0, "k_future": 1.0, "zeta": 0.05, "adv_eps": 0.0}
    adv = ADVANTAGES["entropy_modulated"](b, hp)
    norm = {1.0: 0.0, 3.0: 1.0, 2.0: 0.5}                                # min-max over the batch's three steps
    mean_scale = sum(math.exp(-h) for h in norm.values()) / 3
    g = {h: math.exp(-n) / mean_scale for h, n in norm.items()}
    A = 0.5 / SQRT_HALF                                                  # (1 - .5) / unbiased std sqrt(.5)
    row0_step0 = g[1.0] * A + 0.05 * math.exp(-norm[3.0])                # bonus from the clearer-or-not next step
    row0_step1 = g[3.0] * A                                              # last step: no bonus
    row1_step0 = g[2.0] * -A                                             # only (= last) step: no bonus
    expected = torch.tensor([[row0_step0] * 2 + [row0_step1] * 2, [row1_step0] * 4])
    assert torch.allclose(adv, expected, atol=1e-5)


# ---------------------------------------------------------------- policy losses
def test_dcpo_bounds_near_one_for_likely_tokens_and_wider_for_rare_ones():
    lower, upper = dynamic_bounds(torch.tensor([1.0, 0.01, 0.001]), 0.16, 0.2)
    # q = 1: .5 + .5 sqrt(1 - .64) = .8 and .5 + .5 sqrt(1.8) = 1.1708, i.e. about 1 -/+ eps
    assert lower[0].item() == pytest.approx(0.8) and upper[0].item() == pytest.approx(0.5 + 0.5 * math.sqrt(1.8))
    assert abs(lower[0] - (1 - 0.16)) < 0.05 and abs(upper[0] - (1 + 0.2)) < 0.05
    # q = .01: 1 - 64 < 0 -> .5; .5 + .5 sqrt(81) = 5. q = .001: .5 + .5 sqrt(801) = 14.65 -> capped at 10
    assert lower[1].item() == pytest.approx(0.5) and upper[1].item() == pytest.approx(5.0)
    assert upper[2].item() == pytest.approx(10.0)


def test_dynamic_clip_lets_a_rare_token_move_further():
    old = torch.log(torch.tensor([[1.0, 0.01]]))
    logp = old + math.log(3.0)                                           # ratio 3 on both tokens
    b = batch([1], [0], T=2, old_logprobs=old)
    hp = {"clip_eps": 0.16, "clip_eps_high": 0.2, "clip_cap": 10.0}
    loss, _ = POLICY_LOSSES["dynamic_clip"](logp, b, torch.ones(1, 2), hp)
    # likely token clipped at 1.1708; the rare one's bound is 5 > 3, so the ratio itself counts
    assert torch.allclose(loss, torch.tensor([[-(0.5 + 0.5 * math.sqrt(1.8)), -3.0]]), atol=1e-5)


def test_reinforce_by_hand():
    logp = torch.tensor([[-1.0, -2.0]])
    b = batch([1], [0], T=2)
    loss, _ = POLICY_LOSSES["reinforce"](logp, b, torch.full((1, 2), 0.5), {})
    assert torch.allclose(loss, torch.tensor([[0.5, 1.0]]))


def test_opmd_loss_by_hand():
    mask = torch.tensor([[1, 1], [1, 0]])
    logp = torch.tensor([[-1.0, -3.0], [-2.0, 0.0]])                    # s = [-2, -2]
    old = torch.tensor([[-1.0, -2.0], [-1.0, 0.0]])                     # s_old = [-1.5, -1]
    b = batch([1, 0], [0, 0], T=2, completion_mask=mask, old_logprobs=old)
    adv = ADVANTAGES["group_mean"](b, {})                                # +-.5
    token_loss, _ = POLICY_LOSSES["opmd"](logp, b, adv, {"tau": 1.0})
    loss = LOSS_AGGS["seq_mean_token_mean"](token_loss, mask.float(), {})
    # -(1/G) sum A s = -(.5 (-2) - .5 (-2)) / 2 = 0; (tau/2G) sum (s - s_old)^2 = (.25 + 1) / 4 = .3125
    assert loss.item() == pytest.approx(0.3125)


def test_chord_mu_schedule_and_phi_weights():
    hp = {"mu_peak": 0.9, "mu_valley": 0.05, "mu_warmup": 0.1, "mu_decay": 0.5}
    assert chord_mu(5, 100, hp) == pytest.approx(0.45)                   # half-way through the warm-up
    assert chord_mu(10, 100, hp) == pytest.approx(0.9)                   # peak
    assert chord_mu(35, 100, hp) == pytest.approx(0.05 + 0.85 * 0.5)     # half-way through the cosine
    assert chord_mu(70, 100, hp) == pytest.approx(0.05)                  # valley, held
    assert chord_mu(0, 100, ALGORITHMS["chord"].defaults) == pytest.approx(0.9)
    assert torch.allclose(phi(torch.tensor([0.0, 0.5, 0.9, 1.0])), torch.tensor([0.0, 0.25, 0.09, 0.0]))


@pytest.mark.parametrize("use_phi", [0.0, 1.0])
def test_chord_loss_is_the_mu_mixture_of_two_token_means(use_phi):
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    expert = torch.tensor([False, False, True])
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.3], [0.9, 0.4, 0.1], [0.6, 0.5, 0.5]]))
    b = batch([1, 0, 0], [0, 0, 1], completion_mask=mask, is_expert=expert, old_logprobs=logp.clone(),
              step=0, total_steps=10)
    hp = {"clip_eps": 0.2, "mu_peak": 0.3, "mu_valley": 0.3, "mu_warmup": 0.0, "mu_decay": 0.5, "phi": use_phi}
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3, [0.0] * 3])
    token_loss, metrics = POLICY_LOSSES["chord"](logp, b, adv, hp)
    total = LOSS_AGGS["token_mean"](token_loss, mask.float(), hp)
    rl = -(1.0 * 2 - 1.0 * 3) / 5                                        # ratio 1: -A averaged over the 5 RL tokens
    p = 0.6
    sft = -(p * (1 - p) if use_phi else 1.0) * math.log(p)               # the expert row's single token
    assert metrics["chord/mu"] == pytest.approx(0.3)
    assert total.item() == pytest.approx(0.7 * rl + 0.3 * sft, rel=1e-5)


# ---------------------------------------------------------------- rollout hooks
class ScriptedSource:
    """A RolloutSource whose groups get scripted rewards: reward_fn(index, context) -> list of G rewards."""

    def __init__(self, reward_fn, prompts_per_step=4, group_size=2, solutions=None):
        self.prompts_per_step, self.pad_id, self.group_size = prompts_per_step, 0, group_size
        self.reward_fn, self.solutions, self.next_index, self.calls = reward_fn, solutions, 0, []

    def draw(self, n):
        self.next_index += n
        return list(range(self.next_index - n, self.next_index))

    def prompt(self, i):
        return f"{i}+{i}=?"

    def solution(self, i):
        return self.solutions[i]

    def rollout(self, indices, contexts=None):
        self.calls.append((list(indices), contexts))
        rewards = [r for k, i in enumerate(indices) for r in self.reward_fn(i, contexts[k] if contexts else None)]
        groups = [g for g in range(len(indices)) for _ in range(self.group_size)]
        P = 3 if contexts else 2                                         # guided prompts are longer
        return batch(rewards, groups, P=P, prompts=[self.prompt(i) for i in indices])


def test_plain_rollout_draws_prompts_per_step():
    source = ScriptedSource(lambda i, c: [0.0, 1.0])
    out, _ = ROLLOUTS["plain"](source, {})
    assert out.n_groups == 4 and source.calls == [([0, 1, 2, 3], None)]


def test_dapo_filter_keeps_only_mixed_groups():
    b = batch([1, 0, 1, 1, 0, 0, 0.5, 1], [0, 0, 1, 1, 2, 2, 3, 3])
    assert mixed_groups(b) == [0, 3]
    kept = select_groups(b, mixed_groups(b))
    assert kept.group_ids.tolist() == [0, 0, 1, 1] and kept.rewards.tolist() == [1, 0, 0.5, 1]
    assert kept.prompts == ["p0", "p3"]


def test_dapo_dynamic_sampling_refills_then_stops():
    mixed = {0, 3, 4, 6}                                                # the prompts whose groups are mixed
    source = ScriptedSource(lambda i, c: [1.0, 0.0] if i in mixed else [1.0, 1.0])
    out, metrics = ROLLOUTS["dynamic_sampling"](source, {"max_refill_tries": 5})
    # draw 0-3 -> keep 0, 3; refill 2 (4, 5) -> keep 4; refill 1 (6) -> keep 6: full after 2 refills
    assert out.prompts == ["0+0=?", "3+3=?", "4+4=?", "6+6=?"]
    assert metrics == {"dapo/kept_groups": 4, "dapo/refill_tries": 2, "dapo/sampled_prompts": 7}
    assert mixed_groups(out) == [0, 1, 2, 3]
    # bounded: with no mixed group anywhere it gives up after max_refill_tries and trains on what it has
    source = ScriptedSource(lambda i, c: [0.0, 0.0])
    out, metrics = ROLLOUTS["dynamic_sampling"](source, {"max_refill_tries": 2})
    assert len(source.calls) == 3 and metrics["dapo/kept_groups"] == 0 and out.n_groups == 4


def test_solution_prefix_never_reveals_the_answer_step():
    assert solution_prefix("7+5=12;4+8+1=13;A:132", 1) == "7+5=12;"
    assert solution_prefix("7+5=12;4+8+1=13;A:132", 2) == "7+5=12;4+8+1=13;"
    assert solution_prefix("7+5=12;4+8+1=13;A:132", 3) is None


def test_pope_guides_failed_groups_with_the_shortest_prefix_that_works():
    solutions = {0: "a;b;c;A:1", 1: "a;A:2", 2: "x;y;A:3"}

    def reward(i, context):
        if i == 1:
            return [1.0, 0.0]                                            # solved unguided
        if i == 0 and context and context.endswith("a;b;"):
            return [0.0, 1.0]                                            # prompt 0 needs two steps of guidance
        return [0.0, 0.0]                                                # prompt 2 is never solved

    source = ScriptedSource(reward, prompts_per_step=3, solutions=solutions)
    out, metrics = ROLLOUTS["privileged_guidance"](source, {"max_prefix_steps": 3})
    assert source.calls[1] == ([0, 2], [GUIDE_TEMPLATE.format(prompt="0+0=?", prefix="a;"),
                                        GUIDE_TEMPLATE.format(prompt="2+2=?", prefix="x;")])
    assert source.calls[2][0] == [0, 2] and source.calls[2][1][0].endswith("a;b;")
    assert len(source.calls) == 3              # prompt 0 solved at k = 2; k = 3 would reveal prompt 2's answer step
    # unguided groups kept for prompts 1 (solved) and 2 (never solved); prompt 0's guided group replaces its own
    assert out.prompts == ["1+1=?", "2+2=?", "0+0=?"] and out.rewards.tolist() == [1, 0, 0, 0, 0, 1]
    assert out.input_ids.shape[1] == 3 + 3                               # re-padded to the guided prompt length
    assert metrics["pope/unguided_solve_rate"] == pytest.approx(1 / 6)
    assert metrics["pope/guided_groups"] == 1 and metrics["pope/mean_prefix_steps"] == 2
    assert metrics["pope/still_failed_groups"] == 1


def test_concat_pads_prompts_left_and_completions_right():
    a, b = batch([1, 0], [0, 0], T=2, P=3), batch([1], [0], T=4, P=1)
    out = concat_batches([a, b], pad_id=0)
    assert out.input_ids.shape == (3, 3 + 4) and out.group_ids.tolist() == [0, 0, 1]
    assert out.attention_mask[2].tolist() == [0, 0, 1, 1, 1, 1, 1] and out.attention_mask[0].tolist()[-2:] == [0, 0]
    assert torch.equal(out.input_ids[2, 2:], b.input_ids[0])


# ---------------------------------------------------------------- every preset trains
def _tiny(tok):
    from alignflow.config import TinyModelConfig
    from alignflow.models import build_tiny_model
    return build_tiny_model(tok, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                                 intermediate_size=64))


def length_reward(prompts, completions, **kw):
    """Varies within groups regardless of correctness, so group-relative advantages are non-zero."""
    return [float(len(c) % 2) for c in completions]


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_preset_trains_two_steps_and_moves_every_parameter(name):
    model, logs, before = _train(name, steps=2)
    assert len(logs) == 2 and all(math.isfinite(m["loss"]) for m in logs)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"{name}: parameters not updated: {unchanged}"


def test_missing_inputs_say_what_to_pass():
    from alignflow.config import CandidateConfig, RLConfig
    from alignflow.models import build_tokenizer
    from alignflow.train.rl import train_candidate
    tok = build_tokenizer()
    with pytest.raises(ValueError, match=r"'teacher' model \(extra_models=ExtraModels\(teacher=...\)\)"):
        train_candidate(_tiny(tok), tok, CandidateConfig(name="t", algorithm="opd", steps=1, checkpoints=[1]), 0,
                        RLConfig(), ["1+2=?"], ["3"], Path("unused"), on_log=print)
    with pytest.raises(ValueError, match="solutions="):
        train_candidate(_tiny(tok), tok, CandidateConfig(name="t", algorithm="pope", steps=1, checkpoints=[1]), 0,
                        RLConfig(), ["1+2=?"], ["3"], Path("unused"), on_log=print)


def test_static_engine_drives_the_rl_loop():
    """The loop with engine "static" (own decode loop; eager on CPU): sampled log-probs agree with the trainer's
    (TIS ratio ~1), the verified sync passes after every update, and the policy moves."""
    from alignflow.config import CandidateConfig, RLConfig
    from alignflow.models import build_tokenizer
    from alignflow.train.rl import train_candidate
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = _tiny(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prompts, answers = ["1+2=?", "3+4=?", "12+9=?", "47+85=?"], ["3", "7", "21", "132"]
    logs = []
    with tempfile.TemporaryDirectory() as tmp:
        train_candidate(model, tok, CandidateConfig(name="t", algorithm="grpo", steps=2, checkpoints=[2], lr=1e-2,
                                                    seeds=[0]), 0,
                        RLConfig(prompts_per_step=4, group_size=4, max_new_tokens=8, engine="static"), prompts,
                        answers, Path(tmp), on_log=lambda s, m: logs.append(m), reward_fn=length_reward)
    assert len(logs) == 2
    assert all(abs(m["tis_ratio_mean"] - 1) < 1e-3 and m["sync_max_abs_diff"] < 1e-4 for m in logs), logs
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def _train(name: str, steps: int = 1, micro_batch_size=None, fault: str = "", monkeypatch=None, **rl):
    """`steps` RL steps of a preset on a tiny model, with a reward that varies within groups. ref = the starting
    point (a copy), base and teacher = other tiny models, so implicit rewards and teacher log-probs are
    non-trivial. -> (model, per-step logs, starting parameters)"""
    from alignflow.config import CandidateConfig, RLConfig
    from alignflow.data.task import worked_steps
    from alignflow.models import build_tokenizer
    from alignflow.train.rl import ExtraModels, train_candidate
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = _tiny(tok)
    extra = ExtraModels(ref=copy.deepcopy(model).eval(), base=_tiny(tok).eval(), teacher=_tiny(tok).eval())
    pairs = [(1, 2), (3, 4), (12, 9), (47, 85)]
    prompts, answers = [f"{a}+{b}=?" for a, b in pairs], [str(a + b) for a, b in pairs]
    solutions = [worked_steps(a, b) for a, b in pairs]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logs = []
    if monkeypatch is not None:
        monkeypatch.setenv("ALIGNFLOW_FAULT", fault)
    with tempfile.TemporaryDirectory() as tmp:
        train_candidate(model, tok, CandidateConfig(name="t", algorithm=name, steps=steps, checkpoints=[steps],
                                                    lr=1e-2, seeds=[0]), 0,
                        RLConfig(prompts_per_step=4, group_size=4, max_new_tokens=8,
                                 micro_batch_size=micro_batch_size, **rl), prompts, answers, Path(tmp),
                        on_log=lambda s, m: logs.append(m), reward_fn=length_reward, extra_models=extra,
                        solutions=solutions, expert=list(zip(prompts, solutions)))
    return model, logs, before


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_micro_batched_update_equals_one_pass(name):
    """Same rollouts, update in 1 pass vs in slices of 3 responses: same loss and the same (clipped) gradient
    (every loss aggregation is linear in the per-token loss). Gradients, not parameters: Adam's first step is
    ~lr * sign(g), which turns rounding on near-zero gradients into lr-sized differences."""
    whole, (log_whole,), _ = _train(name, mini_batches=1)     # one optimizer step: its gradient is compared
    sliced, (log_sliced,), _ = _train(name, micro_batch_size=3, mini_batches=1)
    assert log_whole["micro_batches"] == 1 and log_sliced["micro_batches"] >= 6
    assert log_sliced["loss"] == pytest.approx(log_whole["loss"], rel=1e-5, abs=1e-7)
    for (n, a), b in zip(whole.named_parameters(), sliced.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=f"{name}: {n}")


def test_out_of_memory_update_retries_in_halves(monkeypatch, caplog):
    whole, _, _ = _train("grpo")
    retried, (logs,), _ = _train("grpo", fault="oom:rl:1", monkeypatch=monkeypatch)
    assert logs["micro_batches"] == 2 and "out of memory; retrying the update in 2 micro-batches" in caplog.text
    for a, b in zip(whole.parameters(), retried.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


def test_nan_in_the_rl_update_is_skipped_then_aborts_after_n_in_a_row(monkeypatch):
    from alignflow.train.rl import NonFiniteLossError
    updated, _, _ = _train("grpo")
    skipped, (logs,), start = _train("grpo", fault="nan:rl:1", monkeypatch=monkeypatch)
    assert logs["skipped_updates"] == 1
    assert all(torch.equal(p, start[n]) for n, p in skipped.named_parameters())  # the update was not applied
    assert any(not torch.equal(a, b) for a, b in zip(updated.parameters(), skipped.parameters()))
    from alignflow.config import CandidateConfig, RLConfig
    from alignflow.models import build_tokenizer
    from alignflow.train.rl import train_candidate
    monkeypatch.setenv("ALIGNFLOW_FAULT", "nan:rl:2,nan:rl:3")  # step 1 fired above (once per process)
    tok = build_tokenizer()
    expected = "2 non-finite losses/gradients in a row at step 3"
    with tempfile.TemporaryDirectory() as tmp, pytest.raises(NonFiniteLossError, match=expected):
        train_candidate(_tiny(tok), tok, CandidateConfig(name="t", algorithm="grpo", steps=3, checkpoints=[3]), 0,
                        RLConfig(prompts_per_step=2, group_size=2, max_new_tokens=4), ["1+2=?", "3+4=?"], ["3", "7"],
                        Path(tmp), on_log=lambda s, m: None, reward_fn=length_reward, max_nonfinite=2)

