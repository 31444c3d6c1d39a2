"""Every preset's whole loss (its advantage + policy loss + aggregation, as wired in alignflow.algorithms) on one
fixed small batch, against an independent formula written here with plain Python loops and floats - no helper
from alignflow.algorithms - so a wrong piece OR wrong wiring fails. Constants are the papers' values, as literals.
Plus gradient checks where a term must be detached, and the loop's inputs (the reference is not the policy; the
temperature of each log-prob)."""
import math

import pytest
import torch

from alignflow.algorithms import ADVANTAGES, ALGORITHMS, LOSS_AGGS, POLICY_LOSSES, RolloutBatch

MASK = [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]
OLD = [[-0.5, -1.0, -0.2], [-0.3, -2.0, -1.0], [-1.5, -1.0, -1.0], [-0.7, -0.4, -1.1]]      # padding: -1.0
DELTA = [[0.22, -0.3, 0.1], [0.25, -0.1, 0.5], [0.1, 0.4, 0.4], [-0.3, 0.2, 0.05]]        # log pi - log pi_old
ROLLOUT_SHIFT = [[0.1, 0.0, -0.8], [0.0, 0.2, 0.0], [-0.05, 0.0, 0.0], [0.3, 0.0, 0.1]]   # pi_rollout vs pi_old
REF = [[-0.6, -1.3, -0.1], [-0.5, -1.5, -2.0], [-1.0, -0.5, -0.5], [-0.9, -0.2, -1.0]]
BASE = [[-0.9, -1.1, -0.6], [-0.2, -2.5, -3.0], [-1.2, -2.0, -2.0], [-1.3, -0.9, -0.8]]
TEACHER = [[-0.2, -0.8, -0.4], [-0.6, -1.0, -1.5], [-0.9, -0.7, -0.7], [-0.3, -0.5, -0.6]]
PRIV = [[-0.4, -0.6, -0.3], [-0.2, -1.2, -0.5], [-1.1, -0.3, -0.3], [-0.5, -0.9, -0.7]]
ENTROPY = [[1.0, 2.0, 0.5], [1.5, 0.7, 9.0], [0.3, 9.0, 9.0], [2.5, 1.0, 1.2]]            # padding: 9.0
STEP_IDS = [[0, 0, 1], [0, 1, 1], [0, 1, 1], [0, 1, 2]]   # row 2's padding points at a step it never has
REWARDS, GROUPS = [1.0, 0.0, 0.0, 0.5], [0, 0, 1, 1]
B, T = 4, 3
LOGP = [[OLD[i][t] + DELTA[i][t] for t in range(T)] for i in range(B)]
TIS = [[min(math.exp(-ROLLOUT_SHIFT[i][t]), 2.0) for t in range(T)] for i in range(B)]   # min(pi_old/pi_roll, 2)


def tensor(rows):
    return torch.tensor(rows, dtype=torch.float32)


def make_batch(rewards=REWARDS, groups=GROUPS, **fields):
    old = tensor(OLD)
    return RolloutBatch(input_ids=torch.zeros(B, T + 2, dtype=torch.long), attention_mask=torch.ones(B, T + 2),
                        completion_mask=torch.tensor(MASK), rewards=tensor(rewards), group_ids=torch.tensor(groups),
                        old_logprobs=old, rollout_logprobs=old + tensor(ROLLOUT_SHIFT),
                        ref_logprobs=tensor(REF), base_logprobs=tensor(BASE), teacher_logprobs=tensor(TEACHER),
                        privileged_logprobs=tensor(PRIV), entropy=tensor(ENTROPY), step_ids=torch.tensor(STEP_IDS),
                        prompts=[f"p{g}" for g in sorted(set(groups))], **fields)


def wired_loss(name, batch, hp_overrides=None, logp=None):
    """The preset's pieces as the loop calls them. -> (scalar loss, logp tensor with grad)"""
    algo = ALGORITHMS[name]
    hp = algo.hparams(hp_overrides or {})
    logp = tensor(LOGP).requires_grad_(True) if logp is None else logp
    adv = ADVANTAGES[algo.advantage](batch, hp).detach()
    token_loss, _ = POLICY_LOSSES[algo.policy_loss](logp, batch, adv, hp)
    return LOSS_AGGS[algo.loss_agg](token_loss, batch.completion_mask.float(), hp), logp


# ---------------------------------------------------------------- the independent formulas (plain Python)
def group_advantage(rewards, groups, divide_by_std, eps=1e-4):
    """R - mean(group), / (unbiased std + eps) if asked; 0 where the group's std is 0 (or it has one member)."""
    out = []
    for i, r in enumerate(rewards):
        mine = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i]]
        mean = sum(mine) / len(mine)
        std = math.sqrt(sum((x - mean) ** 2 for x in mine) / (len(mine) - 1)) if len(mine) > 1 else 0.0
        if not divide_by_std:
            out.append(r - mean)
        else:
            out.append((r - mean) / (std + eps) if std > 0 else 0.0)
    return out


def ppo_token(i, t, adv, low, high):
    """-min(rho A, clip(rho, low, high) A) for one token, rho = pi / pi_old."""
    rho = math.exp(LOGP[i][t] - OLD[i][t])
    return -min(rho * adv, min(max(rho, low), high) * adv)


def seq_mean_token_mean(token_losses):
    return sum(sum(row[:n]) / n for row, n in zip(token_losses, lengths())) / len(token_losses)


def token_mean(token_losses):
    return sum(sum(row[:n]) for row, n in zip(token_losses, lengths())) / sum(lengths())


def lengths():
    return [sum(row) for row in MASK]


def k3(i, t):
    d = REF[i][t] - LOGP[i][t]
    return math.exp(d) - d - 1


def grpo_formula(low=0.8, high=1.2, agg=seq_mean_token_mean, adv=None):
    adv = group_advantage(REWARDS, GROUPS, True) if adv is None else adv
    return agg([[TIS[i][t] * ppo_token(i, t, adv[i], low, high) for t in range(T)] for i in range(B)])


# ---------------------------------------------------------------- one test per preset
def test_grpo():
    assert wired_loss("grpo", make_batch())[0].item() == pytest.approx(grpo_formula(), rel=1e-5)


def test_pope_trains_with_grpos_loss():
    assert wired_loss("pope", make_batch())[0].item() == pytest.approx(grpo_formula(), rel=1e-5)


def test_dr_grpo_no_std_and_sum_over_constant():
    adv = group_advantage(REWARDS, GROUPS, False)
    losses = [[TIS[i][t] * ppo_token(i, t, adv[i], 0.8, 1.2) for t in range(T)] for i in range(B)]
    expected = sum(sum(row[:n]) for row, n in zip(losses, lengths())) / (B * T)
    assert wired_loss("dr_grpo", make_batch())[0].item() == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(grpo_formula(), rel=1e-3)            # the batch tells them apart


def test_dapo_clip_higher_token_mean():
    expected = grpo_formula(0.8, 1.28, token_mean)
    assert wired_loss("dapo", make_batch())[0].item() == pytest.approx(expected, rel=1e-5)


def test_dapo_asymmetric_clip_case():
    """rho = e^0.22 = 1.246 with A > 0: inside DAPO's [0.8, 1.28] (counts as is), outside GRPO's [0.8, 1.2]."""
    one = RolloutBatch(input_ids=torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 3),
                       completion_mask=torch.ones(1, 1), rewards=torch.zeros(1),
                       group_ids=torch.zeros(1, dtype=torch.long),
                       old_logprobs=torch.zeros(1, 1), rollout_logprobs=torch.zeros(1, 1))
    logp, adv = torch.full((1, 1), 0.22), torch.ones(1, 1)
    dapo, m_dapo = POLICY_LOSSES["clipped_ratio"](logp, one, adv, ALGORITHMS["dapo"].hparams({}))
    grpo, m_grpo = POLICY_LOSSES["clipped_ratio"](logp, one, adv, ALGORITHMS["grpo"].hparams({}))
    assert dapo.item() == pytest.approx(-math.exp(0.22)) and m_dapo["clip_frac"] == 0.0
    assert grpo.item() == pytest.approx(-1.2) and m_grpo["clip_frac"] == 1.0
    # the low side stays symmetric: rho = e^-0.3 = 0.741 with A < 0 is clipped at 0.8 by both
    low, _ = POLICY_LOSSES["clipped_ratio"](torch.full((1, 1), -0.3), one, -adv, ALGORITHMS["dapo"].hparams({}))
    assert low.item() == pytest.approx(0.8)


@pytest.mark.parametrize("length_normalise", [0.0, 1.0])
def test_srppo_implicit_reward_and_kl_to_sft(length_normalise):
    implicit = [sum(REF[i][t] - BASE[i][t] for t in range(n)) / (n if length_normalise else 1)
                for i, n in enumerate(lengths())]
    adv = group_advantage(implicit, GROUPS, True)
    losses = [[TIS[i][t] * ppo_token(i, t, adv[i], 0.8, 1.2) + 0.04 * k3(i, t) for t in range(T)] for i in range(B)]
    got = wired_loss("srppo", make_batch(), {"length_normalise": length_normalise})[0].item()
    assert got == pytest.approx(seq_mean_token_mean(losses), rel=1e-5)


def test_dcpo_dynamic_bounds_sas_token_mean():
    times, h_mean, h_std = [3, 3, 2, 2], [0.8, 0.8, 0.3, 0.3], [0.5, 0.5, 0.2, 0.2]   # row 0 takes SA_total
    step_adv = group_advantage(REWARDS, GROUPS, True)
    adv = []
    for i in range(B):
        a_new, a_tot, n = step_adv[i], (REWARDS[i] - h_mean[i]) / (h_std[i] + 1e-4), times[i]
        sa_new, sa_tot = (n - 1) / n * a_new + a_tot / n, a_new / n + (n - 1) / n * a_tot
        adv.append(sa_new if abs(sa_new) < abs(sa_tot) else sa_tot)
    losses = []
    for i in range(B):
        row = []
        for t in range(T):
            q = math.exp(OLD[i][t])
            low = 0.5 + 0.5 * math.sqrt(max(0.0, 1 - 4 * 0.16 / q))
            high = min(0.5 + 0.5 * math.sqrt(1 + 4 * 0.2 / q), 10.0)
            row.append(TIS[i][t] * ppo_token(i, t, adv[i], low, high))
        losses.append(row)
    batch = make_batch(times_seen=tensor(times), history_mean=tensor(h_mean), history_std=tensor(h_std))
    assert wired_loss("dcpo", batch)[0].item() == pytest.approx(token_mean(losses), rel=1e-5)


@pytest.mark.parametrize("name, lam", [("opd", 1.0), ("exopd", 1.25)])
def test_gopd_per_token_advantage(name, lam):
    losses = [[TIS[i][t] * ppo_token(i, t, lam * TEACHER[i][t] + (1 - lam) * REF[i][t] - OLD[i][t], 0.8, 1.2)
               for t in range(T)] for i in range(B)]
    assert wired_loss(name, make_batch())[0].item() == pytest.approx(token_mean(losses), rel=1e-5)


def test_opsd_reverse_kl_to_the_privileged_self():
    losses = [[TIS[i][t] * ppo_token(i, t, -(OLD[i][t] - PRIV[i][t]), 0.8, 1.2) for t in range(T)] for i in range(B)]
    assert wired_loss("opsd", make_batch())[0].item() == pytest.approx(token_mean(losses), rel=1e-5)
    task = group_advantage(REWARDS, GROUPS, True)
    hybrid = [[TIS[i][t] * ppo_token(i, t, task[i] - 0.1 * (OLD[i][t] - PRIV[i][t]), 0.8, 1.2) for t in range(T)]
              for i in range(B)]
    got = wired_loss("opsd", make_batch(), {"task_weight": 1.0, "distill_coef": 0.1})[0].item()
    assert got == pytest.approx(token_mean(hybrid), rel=1e-5)


def test_opmd_reinforce_plus_proximal_term():
    adv = group_advantage(REWARDS, GROUPS, False)
    total = 0.0
    for i, n in enumerate(lengths()):
        s = sum(LOGP[i][:n]) / n
        s_old = sum(OLD[i][:n]) / n
        linear = sum(-adv[i] * LOGP[i][t] * TIS[i][t] for t in range(n)) / n
        total += linear + 1.0 / 2 * (s - s_old) ** 2
    assert wired_loss("opmd", make_batch())[0].item() == pytest.approx(total / B, rel=1e-5)


def test_asymre_shifted_baseline_with_importance_weight():
    adv = [a + 0.1 for a in group_advantage(REWARDS, GROUPS, False)]           # R - (mean - 0.1)
    losses = [[-adv[i] * LOGP[i][t] * TIS[i][t] for t in range(T)] for i in range(B)]
    expected = seq_mean_token_mean(losses)
    assert wired_loss("asymre", make_batch())[0].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("scale", [1.0, 0.1])   # 0.1: entropies spanning less than 1
def test_empg_entropy_modulated_steps(scale):
    outcome = group_advantage(REWARDS, GROUPS, True)
    steps = {}                                                                 # (row, step) -> token entropies
    for i, n in enumerate(lengths()):
        for t in range(n):
            steps.setdefault((i, STEP_IDS[i][t]), []).append(scale * ENTROPY[i][t])
    H = {key: sum(v) / len(v) for key, v in steps.items()}
    lo, hi = min(H.values()), max(H.values())
    Hn = {key: (h - lo) / (hi - lo) for key, h in H.items()}
    mean_scale = sum(math.exp(-h) for h in Hn.values()) / len(Hn)
    losses = []
    for i in range(B):
        row = []
        for t in range(T):
            s = STEP_IDS[i][t]
            a = math.exp(-Hn[(i, s)]) / mean_scale * outcome[i] if (i, s) in Hn else 0.0
            if (i, s + 1) in Hn:                                               # no bonus on a row's last step
                a += 0.05 * math.exp(-Hn[(i, s + 1)])
            row.append(TIS[i][t] * ppo_token(i, t, a, 0.8, 1.2))
        losses.append(row)
    batch = make_batch()
    batch.entropy = batch.entropy * scale
    assert wired_loss("empg", batch)[0].item() == pytest.approx(seq_mean_token_mean(losses), rel=1e-5)


CHORD_EXPERT, CHORD_GROUPS, CHORD_REWARDS = [False, False, False, True], [0, 0, 1, 2], [1.0, 0.0, 0.0, 0.0]


def chord_batch():
    batch = make_batch(CHORD_REWARDS, CHORD_GROUPS, is_expert=torch.tensor(CHORD_EXPERT), step=2, total_steps=10)
    batch.rollout_logprobs[3] = batch.old_logprobs[3]                          # expert rows: TIS weight 1 (the loop)
    return batch


@pytest.mark.parametrize("use_phi", [0.0, 1.0])
def test_chord_mixture_of_grpo_and_sft(use_phi):
    hp = {"phi": use_phi} if use_phi else {}
    mu = 0.05 + (0.9 - 0.05) * 0.5 * (1 + math.cos(math.pi * 0.2 / 0.5))       # progress 0.2 of a 0.5 cosine decay
    adv = group_advantage(CHORD_REWARDS, CHORD_GROUPS, True)
    rl_tokens = [(i, t) for i, n in enumerate(lengths()) for t in range(n) if not CHORD_EXPERT[i]]
    sft_tokens = [(i, t) for i, n in enumerate(lengths()) for t in range(n) if CHORD_EXPERT[i]]
    rl = sum(TIS[i][t] * ppo_token(i, t, adv[i], 0.8, 1.2) for i, t in rl_tokens) / len(rl_tokens)
    weight = (lambda p: p * (1 - p)) if use_phi else (lambda p: 1.0)
    sft = sum(-weight(math.exp(LOGP[i][t])) * LOGP[i][t] for i, t in sft_tokens) / len(sft_tokens)
    loss, logp = wired_loss("chord", chord_batch(), hp)
    assert loss.item() == pytest.approx((1 - mu) * rl + mu * sft, rel=1e-5)
    # phi(p) is a weight, not a path for the gradient: d loss / d logp = -mu phi(p) / n_sft on expert tokens
    loss.backward()
    for i, t in sft_tokens:
        expected = -mu * weight(math.exp(LOGP[i][t])) / len(sft_tokens)
        assert logp.grad[i, t].item() == pytest.approx(expected, rel=1e-5)


def test_every_preset_has_its_formula_here():
    tested = {"grpo", "pope", "dr_grpo", "dapo", "srppo", "dcpo", "opd", "exopd", "opsd", "opmd", "asymre", "empg",
              "chord"}
    assert set(ALGORITHMS) == tested


# ---------------------------------------------------------------- signs and gradients
def test_kl_penalty_pulls_towards_the_reference():
    """With A = 0 the loss is beta * KL >= 0, and its gradient moves log pi towards log pi_ref."""
    batch = make_batch(rewards=[0.0] * B)
    loss, logp = wired_loss("grpo", batch, {"beta": 0.1})
    per_row = [sum(0.1 * k3(i, t) for t in range(n)) / n for i, n in enumerate(lengths())]
    assert loss.item() == pytest.approx(sum(per_row) / B, rel=1e-5) and loss.item() > 0
    loss.backward()
    for i, n in enumerate(lengths()):
        for t in range(n):   # gradient descent moves logp against the gradient: towards ref (0 where equal)
            gap = LOGP[i][t] - REF[i][t]
            assert logp.grad[i, t].item() * gap > 0 or abs(gap) < 1e-6


def test_ratio_gradient_flows_only_through_the_new_policy():
    """d/d logp of -rho A at rho = 1 (unclipped) is -A: old log-probs and TIS weights carry no gradient."""
    batch = make_batch()
    logp = batch.old_logprobs.clone().requires_grad_(True)
    adv = torch.ones(B, T)
    loss, _ = POLICY_LOSSES["clipped_ratio"](logp, batch, adv, {"clip_eps": 0.2})
    (loss * batch.completion_mask).sum().backward()
    expected = -tensor(TIS) * batch.completion_mask
    torch.testing.assert_close(logp.grad, expected)


def test_presets_wire_the_pieces_the_papers_name():
    wiring = {name: (a.advantage, a.policy_loss, a.loss_agg) for name, a in ALGORITHMS.items()}
    assert wiring["dr_grpo"] == ("group_mean", "clipped_ratio", "token_sum_norm")
    assert wiring["grpo"] == ("group_std", "clipped_ratio", "seq_mean_token_mean")
    assert wiring["dapo"] == ("group_std", "clipped_ratio", "token_mean")
    assert ALGORITHMS["dapo"].defaults["clip_eps_high"] == 0.28 and ALGORITHMS["dapo"].rollout == "dynamic_sampling"


# ---------------------------------------------------------------- the loop's inputs
def test_loop_scores_the_reference_model_at_t1_and_the_policy_at_the_sampling_temperature():
    """ref / base / teacher log-probs come from those models (not the policy) at temperature 1 (their own
    distributions); pi_old, which the ratio divides by, at the sampling temperature."""
    from alignflow.config import RLConfig, TinyModelConfig
    from alignflow.models import build_tiny_model, build_tokenizer
    from alignflow.rollout import token_logprobs
    from alignflow.train.rl import ExtraModels, _fill_inputs
    tok = build_tokenizer()
    shape = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    models = []
    for seed in range(4):
        torch.manual_seed(seed)
        models.append(build_tiny_model(tok, shape).eval())
    policy, ref, base, teacher = models
    ids = torch.randint(4, len(tok) - 1, (4, 7), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    batch = RolloutBatch(input_ids=ids, attention_mask=attention, completion_mask=torch.ones(4, 3),
                         rewards=torch.zeros(4), group_ids=torch.tensor([0, 0, 1, 1]),
                         old_logprobs=torch.zeros(4, 3), rollout_logprobs=torch.zeros(4, 3), prompts=["a", "b"])
    _fill_inputs(batch, frozenset({"ref", "base", "teacher"}), policy, ExtraModels(ref=ref, base=base, teacher=teacher),
                 tok, RLConfig(temperature=0.5), {}, None, None)
    with torch.no_grad():
        for name, model in (("ref", ref), ("base", base), ("teacher", teacher)):
            own = token_logprobs(model, ids, attention, 3, 1.0)
            torch.testing.assert_close(getattr(batch, f"{name}_logprobs"), own)
        assert not torch.allclose(batch.ref_logprobs, token_logprobs(policy, ids, attention, 3, 1.0), atol=1e-3)
        torch.testing.assert_close(batch.old_logprobs, token_logprobs(policy, ids, attention, 3, 0.5))


def test_sas_tie_takes_sa_total():
    """|SA_new| = |SA_total| with opposite signs (A_new = 1, A_total = -1, i = 3): the rule keeps SA_total."""
    from alignflow.algorithms.dcpo import smooth_standardised
    one = torch.ones(1)
    got = smooth_standardised(one, one * 0, one, one * 2, one, one * 3, 0.0)
    assert got.item() == pytest.approx(1 / 3 - 2 / 3)


def test_chord_mu_over_a_one_step_run():
    from alignflow.algorithms.chord import chord_mu
    hp = {"mu_peak": 0.9, "mu_valley": 0.05, "mu_warmup": 0.0, "mu_decay": 1.0}
    assert chord_mu(1, 1, hp) == pytest.approx(0.05)                 # progress 1 = the end of the decay
    assert chord_mu(0, 0, hp) == pytest.approx(0.9)                  # a zero-length run does not divide by 0
