"""The update of the RL loop (alignflow/train/update.py): mini-batch PPO epochs against a hand-written
sequence of optimizer steps on a toy policy, the scheduler's count, skipped updates, and the mechanisms that only
act from a rollout's second optimizer step (the clip, OPMD's proximal term)."""
import math

import pytest
import torch
import torch.nn.functional as F

from alignflow.algorithms import ALGORITHMS, RolloutBatch
from alignflow.config import RLConfig
from alignflow.train.update import NonFiniteLossError, UpdateCounters, update_policy

V, T = 5, 3


class ToyPolicy(torch.nn.Module):
    """A context-free policy: log pi(token) = log_softmax(w / temperature)[token]. Same call as rl._Scorer."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.1, 0.5, -0.4]))

    def forward(self, input_ids, attention_mask, completion_len, temperature):
        assert attention_mask is not None
        return F.log_softmax(self.w / temperature, -1)[input_ids[:, -completion_len:]]


IDS = torch.tensor([[0, 1, 2], [3, 3, 1], [4, 0, 0], [2, 1, 3]])
B_ROWS = 4
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])


def toy_batch(policy):
    with torch.no_grad():
        old = policy(IDS, torch.ones_like(IDS), T, 1.0) * MASK
    return RolloutBatch(input_ids=IDS, attention_mask=torch.ones_like(IDS), completion_mask=MASK,
                        rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]), group_ids=torch.tensor([0, 0, 1, 1]),
                        old_logprobs=old, rollout_logprobs=old.clone())


def run_update(policy, cfg, lr=2.0, algo="grpo", step=0, max_nonfinite=5):
    batch = toy_batch(policy)
    a = 0.5 / math.sqrt(0.5)       # group-standardised rewards 1, 0: +-(0.5 / unbiased std sqrt(.5))
    adv = torch.tensor([a, -a, -a, a])[:, None].expand(-1, T).clone()
    optimizer = torch.optim.SGD(policy.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    algorithm = ALGORITHMS[algo]
    metrics = update_policy(policy, policy, optimizer, scheduler, batch, adv, MASK.float(), algorithm,
                            algorithm.hparams({}), cfg, UpdateCounters(slice_rows=cfg.micro_batch_size), max_nonfinite,
                            step)
    return metrics, scheduler, batch, adv


def grpo_loss_by_hand(w, rows, batch, adv, eps=0.2):
    """(1/|rows|) sum_i (1/|y_i|) sum_t -min(r A, clip(r, 1-eps, 1+eps) A), r = pi / pi_old, in plain loops."""
    logp = F.log_softmax(w, -1)
    total = 0.0
    for i in rows:
        n_i = int(MASK[i].sum())
        seq = 0.0
        for t in range(n_i):
            r = torch.exp(logp[IDS[i, t]] - batch.old_logprobs[i, t])
            A = float(adv[i, t])
            seq = seq - torch.minimum(r * A, torch.clamp(r, 1 - eps, 1 + eps) * A)
        total = total + seq / n_i
    return total / len(rows)


@pytest.mark.parametrize("micro_batch_size", [None, 1])
def test_two_mini_batches_are_two_sgd_steps_each_normalised_over_its_own_rows(micro_batch_size):
    policy = ToyPolicy()
    w = policy.w.detach().clone()
    metrics, scheduler, batch, adv = run_update(policy, RLConfig(mini_batches=2, grad_clip=1e9,
                                                                 micro_batch_size=micro_batch_size))
    clip_fracs = []
    for rows in ([0, 1], [2, 3]):                       # contiguous mini-batches, old log-probs from the rollout
        tokens = [(i, t) for i in rows for t in range(int(MASK[i].sum()))]
        logp = F.log_softmax(w, -1)
        ratios = [math.exp(logp[IDS[i, t]] - batch.old_logprobs[i, t]) for i, t in tokens]
        clip_fracs.append(sum(not 0.8 <= r <= 1.2 for r in ratios) / len(tokens))   # over real tokens
        w = w.requires_grad_(True)
        (grad,) = torch.autograd.grad(grpo_loss_by_hand(w, rows, batch, adv), w)
        w = (w - 2.0 * grad).detach()
    torch.testing.assert_close(policy.w.detach(), w, rtol=1e-5, atol=1e-6)
    assert metrics["optimizer_steps"] == 2 and metrics["mini_batches"] == 2 and scheduler.last_epoch == 2
    assert clip_fracs[0] == 0 and clip_fracs[1] > 0     # the second step saw ratios outside [0.8, 1.2]
    assert metrics["clip_frac"] == pytest.approx(sum(clip_fracs) / 2)


def test_epochs_times_mini_batches_optimizer_steps_and_one_step_never_clips():
    metrics, scheduler, _, _ = run_update(ToyPolicy(), RLConfig(mini_batches=2, ppo_epochs=3))
    assert metrics["optimizer_steps"] == 6 and scheduler.last_epoch == 6
    metrics, scheduler, _, _ = run_update(ToyPolicy(), RLConfig(mini_batches=1, ppo_epochs=1))
    assert metrics["optimizer_steps"] == 1 and scheduler.last_epoch == 1 and metrics["clip_frac"] == 0.0


def test_more_mini_batches_than_rows_is_one_row_each():
    metrics, _, _, _ = run_update(ToyPolicy(), RLConfig(mini_batches=64))
    assert metrics["mini_batches"] == 4 and metrics["optimizer_steps"] == 4


def test_preset_default_applies_unless_the_config_says():
    assert ALGORITHMS["dapo"].mini_batches == 16 and ALGORITHMS["grpo"].mini_batches == 1
    metrics, _, _, _ = run_update(ToyPolicy(), RLConfig(), algo="opmd")       # opmd's default: 4
    assert metrics["mini_batches"] == 4
    metrics, _, _, _ = run_update(ToyPolicy(), RLConfig(mini_batches=2), algo="opmd")
    assert metrics["mini_batches"] == 2


def test_a_skipped_update_does_not_step_the_scheduler_or_the_weights(monkeypatch):
    from alignflow import faults
    monkeypatch.setenv("ALIGNFLOW_FAULT", "nan:rl:901")
    monkeypatch.setattr(faults, "_fired", set())          # a fault fires once per process: rerunnable test
    policy = ToyPolicy()
    start = policy.w.detach().clone()
    metrics, scheduler, _, _ = run_update(policy, RLConfig(mini_batches=1), step=900)
    assert metrics["optimizer_steps"] == 0 and scheduler.last_epoch == 0
    assert torch.equal(policy.w.detach(), start)
    counters = UpdateCounters(nonfinite_in_row=1)
    with pytest.raises(NonFiniteLossError, match="2 non-finite"):
        counters.skip(2, 910)


def test_opmd_proximal_term_has_a_gradient_from_the_second_step():
    first, _, _, _ = run_update(ToyPolicy(), RLConfig(mini_batches=1), algo="opmd")
    assert first["opmd/prox_grad"] == 0.0               # one step per rollout: s = s_old, no gradient
    several, _, _, _ = run_update(ToyPolicy(), RLConfig(mini_batches=2), algo="opmd")
    assert several["opmd/prox_grad"] > 1e-3


# ---------------------------------------------------------------- slicing, faults, DDP hooks (fast, toy policy)
def test_micro_batches_change_only_the_slicing_not_the_metrics():
    whole, _, batch, adv = run_update(ToyPolicy(), RLConfig(mini_batches=2, grad_clip=1e9))
    sliced, _, _, _ = run_update(ToyPolicy(), RLConfig(mini_batches=2, grad_clip=1e9, micro_batch_size=1))
    w = ToyPolicy().w.detach().clone()
    losses = []
    for rows in ([0, 1], [2, 3]):
        w = w.requires_grad_(True)
        loss = grpo_loss_by_hand(w, rows, batch, adv)
        (grad,) = torch.autograd.grad(loss, w)
        losses.append(loss.item())
        w = (w - 2.0 * grad).detach()
    assert whole["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)      # the mean over the optimizer steps
    for key in ("loss", "grad_norm", "clip_frac"):
        assert sliced[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key
    assert whole["micro_batches"] == 1 and sliced["micro_batches"] == 2 and whole["lr"] == 2.0
    whole, _, _, _ = run_update(ToyPolicy(), RLConfig(mini_batches=1, ppo_epochs=3, grad_clip=1e9), lr=3.0)
    sliced, _, _, _ = run_update(ToyPolicy(), RLConfig(mini_batches=1, ppo_epochs=3, grad_clip=1e9,
                                                       micro_batch_size=1), lr=3.0)
    assert whole["clip_frac"] > 0 and sliced["clip_frac"] == pytest.approx(whole["clip_frac"], rel=1e-5)


class NoSyncPolicy(ToyPolicy):
    """Records DDP's no_sync: gradients must be all-reduced once per optimizer step, on its last slice."""

    def __init__(self):
        super().__init__()
        self.no_sync_entries = 0

    def no_sync(self):
        import contextlib
        self.no_sync_entries += 1
        return contextlib.nullcontext()

    def forward(self, input_ids, attention_mask, completion_len, temperature):
        assert attention_mask is not None and attention_mask.shape == input_ids.shape
        return super().forward(input_ids, attention_mask, completion_len, temperature)


def test_only_the_last_slice_of_a_mini_batch_all_reduces():
    policy = NoSyncPolicy()
    run_update(policy, RLConfig(mini_batches=2, micro_batch_size=1))       # 2 steps x 2 slices
    assert policy.no_sync_entries == 2


def test_oom_retries_in_smaller_slices_and_keeps_them(monkeypatch, caplog):
    from alignflow import faults
    monkeypatch.setenv("ALIGNFLOW_FAULT", "oom:rl:31")
    monkeypatch.setattr(faults, "_fired", set())
    counters = UpdateCounters()
    policy, cfg = ToyPolicy(), RLConfig(mini_batches=1)
    batch, adv = toy_batch(policy), torch.ones(B_ROWS, T)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    algo = ALGORITHMS["grpo"]
    metrics = update_policy(policy, policy, optimizer, scheduler, batch, adv, MASK.float(), algo, algo.hparams({}),
                            cfg, counters, 5, 30)
    assert metrics["micro_batches"] == 2 and counters.slice_rows == 2
    assert "rl step 31: out of memory; retrying the update in 2 micro-batches" in caplog.text
    again = update_policy(policy, policy, optimizer, scheduler, batch, adv, MASK.float(), algo, algo.hparams({}),
                          cfg, counters, 5, 31)
    assert again["micro_batches"] == 2                                     # the smaller slices are kept


def test_a_nan_step_is_skipped_and_the_next_mini_batch_still_steps(monkeypatch):
    from alignflow import faults
    monkeypatch.setenv("ALIGNFLOW_FAULT", "nan:rl:41")
    monkeypatch.setattr(faults, "_fired", set())
    policy = ToyPolicy()
    batch = toy_batch(policy)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    counters, algo = UpdateCounters(), ALGORITHMS["grpo"]
    metrics = update_policy(policy, policy, optimizer, scheduler, batch, torch.ones(B_ROWS, T), MASK.float(), algo,
                            algo.hparams({}), RLConfig(mini_batches=2), counters, 5, 40)
    assert metrics["optimizer_steps"] == 1 and scheduler.last_epoch == 1
    assert counters.skipped == 1 and counters.nonfinite_in_row == 0        # reset by the good step after it
    monkeypatch.setattr(faults, "_fired", set())
    with pytest.raises(NonFiniteLossError, match="1 non-finite losses/gradients in a row at step 41"):
        update_policy(policy, policy, optimizer, scheduler, batch, torch.ones(B_ROWS, T), MASK.float(), algo,
                      algo.hparams({}), RLConfig(mini_batches=2), UpdateCounters(), 1, 40)


def test_a_non_finite_gradient_with_a_finite_loss_is_skipped(monkeypatch):
    from alignflow.train import update as update_module
    monkeypatch.setattr(update_module.torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("inf")))
    policy = ToyPolicy()
    start = policy.w.detach().clone()
    metrics, scheduler, _, _ = run_update(policy, RLConfig(mini_batches=1))
    assert metrics["optimizer_steps"] == 0 and scheduler.last_epoch == 0 and torch.equal(policy.w.detach(), start)


def test_counters_count_skips_and_name_the_step():
    counters = UpdateCounters()
    counters.skip(3, 6)
    assert counters.skipped == 1 and counters.nonfinite_in_row == 1
    with pytest.raises(NonFiniteLossError, match="2 non-finite losses/gradients in a row at step 7"):
        counters.skip(2, 6)


def test_rows_of_slices_per_response_fields_and_copies_extras():
    from alignflow.train.update import rows_of
    batch = toy_batch(ToyPolicy())
    batch.extras = {"k": 1}
    part = rows_of(batch, torch.tensor([1, 3]))
    part.extras["counts"] = "set on the slice"
    assert part.extras["k"] == 1 and "counts" not in batch.extras      # a copy: the rollout batch is untouched
    assert part.rewards.tolist() == [0.0, 1.0] and torch.equal(part.input_ids, IDS[[1, 3]])
    assert part.step == batch.step and part.prompts == batch.prompts


def test_one_process_counts_and_history_are_the_local_ones():
    from alignflow.algorithms import RewardHistory
    from alignflow.algorithms.core import BatchCounts
    from alignflow.train.update import global_counts, shared_history_update
    counts = global_counts(MASK.float(), torch.tensor([False, True, False, True]))
    assert counts == BatchCounts(rows=4, tokens=9.0, width=3, expert_tokens=5.0)
    assert global_counts(MASK.float(), None).expert_tokens == 0.0
    rewards, groups = torch.tensor([1.0, 0.0, 0.5, 0.5]), torch.tensor([0, 0, 1, 1])
    shared = shared_history_update(RewardHistory(), ["a", "b"], rewards, groups)
    local = RewardHistory().update(["a", "b"], rewards, groups)
    for got, want in zip(shared, local):
        assert torch.equal(got, want)


@pytest.fixture
def twin_rank(monkeypatch):
    """Pretend to be rank 0 of two whose other rank holds an identical batch (its counts, its sums): the
    all-reduced normalisers double, DDP's average of two equal gradients is that gradient - so the step must be
    exactly the one-process step, and any normaliser or share-scaling left local shows."""
    from alignflow.train import distributed
    twice = lambda v: [2 * x for x in v] if isinstance(v, list) else v * 2   # noqa: E731
    monkeypatch.setattr(distributed, "sum_across_ranks", twice)
    monkeypatch.setattr(distributed, "max_across_ranks", lambda v: v)
    monkeypatch.setattr(distributed, "min_across_ranks", lambda v: v)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)


@pytest.mark.parametrize("algo", ["grpo", "dapo", "dr_grpo", "chord"])
def test_a_twin_rank_takes_the_one_process_step(algo, request):
    def run():
        policy = ToyPolicy()
        batch = toy_batch(policy)
        batch.is_expert, batch.step, batch.total_steps = torch.tensor([False, False, False, True]), 1, 4
        optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        algorithm = ALGORITHMS[algo]
        metrics = update_policy(policy, policy, optimizer, scheduler, batch, torch.ones(B_ROWS, T) * 0.5,
                                MASK.float(), algorithm, algorithm.hparams({}),
                                RLConfig(mini_batches=1, ppo_epochs=2, grad_clip=1e9, micro_batch_size=2),
                                UpdateCounters(slice_rows=2), 5, 0)
        return policy.w.detach(), metrics["loss"]
    alone_w, alone_loss = run()
    request.getfixturevalue("twin_rank")
    twin_w, twin_loss = run()
    torch.testing.assert_close(twin_w, alone_w, rtol=1e-5, atol=1e-7)
    assert twin_loss == pytest.approx(alone_loss, rel=1e-5)


def test_history_takes_every_ranks_groups(monkeypatch):
    from alignflow.algorithms import RewardHistory
    from alignflow.train import distributed
    from alignflow.train.update import shared_history_update
    theirs = (["b", "c"], [0.0, 0.0, 0.5, 1.0], [0, 0, 1, 1])
    for me in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda: me)
        monkeypatch.setattr(distributed, "all_gather_objects", lambda obj: [obj, theirs] if me == 0 else [theirs, obj])
        history = RewardHistory()
        got = shared_history_update(history, ["a", "b"], torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1]))
        one = RewardHistory()
        ours = (["a", "b"], [1.0, 0.0, 1.0, 1.0])
        order = (ours, theirs[:2]) if me == 0 else (theirs[:2], ours)
        want = one.update(order[0][0] + order[1][0], torch.tensor(order[0][1] + order[1][1]),
                          torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
        mine = slice(0, 4) if me == 0 else slice(4, 8)
        for g, w in zip(got, want):
            assert torch.equal(g, w[mine])
        assert history.state_dict()["prompts"] == one.state_dict()["prompts"]
        assert torch.equal(history.state_dict()["stats"], one.state_dict()["stats"])
