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
        return F.log_softmax(self.w / temperature, -1)[input_ids[:, -completion_len:]]


IDS = torch.tensor([[0, 1, 2], [3, 3, 1], [4, 0, 0], [2, 1, 3]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])


def toy_batch(policy):
    with torch.no_grad():
        old = policy(IDS, None, T, 1.0) * MASK
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
    for rows in ([0, 1], [2, 3]):                       # contiguous mini-batches, old log-probs from the rollout
        w = w.requires_grad_(True)
        (grad,) = torch.autograd.grad(grpo_loss_by_hand(w, rows, batch, adv), w)
        w = (w - 2.0 * grad).detach()
    torch.testing.assert_close(policy.w.detach(), w, rtol=1e-5, atol=1e-6)
    assert metrics["optimizer_steps"] == 2 and metrics["mini_batches"] == 2 and scheduler.last_epoch == 2
    assert metrics["clip_frac"] > 0                      # the second step saw ratios outside [0.8, 1.2]


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
    monkeypatch.setenv("ALIGNFLOW_FAULT", "nan:rl:901")
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
