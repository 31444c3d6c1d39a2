"""POPE, privileged on-policy exploration ("POPE: Learning to Reason on Hard Problems via Privileged On-Policy
Exploration", arXiv:2601.18779). For a prompt whose whole group fails (all rewards 0), roll it out again with a
prefix of the oracle solution in the prompt and an instruction to continue; train on the guided group (only its
generated tokens: the prefix is prompt, not completion) with GRPO. The oracle solution is never a training target.
Solve rate on the unguided rollouts is reported as `pope/unguided_solve_rate`.

Our reading of the details the paper leaves open (see docs/algorithms.md):
- prefix lengths are counted in solution steps (';' or newline separated) and never include the last step (the
  answer); the shortest of k = 1, 2, ..., max_prefix_steps steps that yields a non-zero reward is kept
  ("shortest prefix that works"); a prompt still failing keeps its unguided group (no signal, no harm);
- the guided group replaces the failed unguided group in the batch (an all-zero group has no group-relative
  signal), so a batch mixes unguided (solved) and guided (hard) prompts;
- the reward of a guided rollout scores its own completion against the original prompt and answer.
"""
import re

from alignflow.algorithms import grpo  # noqa: F401  (registers group_std)
from alignflow.algorithms.core import (ROLLOUTS, Algorithm, RolloutBatch, RolloutSource, concat_batches,
                                       register_algorithm, select_groups)

GUIDE_TEMPLATE = "{prompt} continue this partial solution: {prefix}"   # lowercase: the tiny tokenizer's alphabet


def solution_prefix(solution: str, n_steps: int) -> str | None:
    """The first n_steps steps of a worked solution (with their separators), or None when that would reach the
    last step, which holds the answer."""
    parts = re.split(r"(?<=[;\n])", solution.strip())
    return "".join(parts[:n_steps]) if n_steps < len(parts) else None


def failed_groups(batch: RolloutBatch) -> list[int]:
    return [g for g in range(batch.n_groups) if not bool((batch.rewards[batch.group_ids == g] > 0).any())]


@ROLLOUTS.register("privileged_guidance")
def guided_rollout(source: RolloutSource, hp: dict) -> tuple[RolloutBatch, dict]:
    indices = source.draw(source.prompts_per_step)
    batch = source.rollout(indices)
    failed = failed_groups(batch)
    metrics = {"pope/unguided_solve_rate": float((batch.rewards > 0).float().mean()),
               "pope/unguided_failed_groups": len(failed)}
    guided, prefix_steps, pending = [], [], failed
    for k in range(1, int(hp["max_prefix_steps"]) + 1):
        tries = [(g, solution_prefix(source.solution(indices[g]), k)) for g in pending]
        tries = [(g, prefix) for g, prefix in tries if prefix is not None]
        if not tries:
            break
        contexts = [GUIDE_TEMPLATE.format(prompt=source.prompt(indices[g]), prefix=p) for g, p in tries]
        attempt = source.rollout([indices[g] for g, _ in tries], contexts)
        still_failing = set(failed_groups(attempt))
        solved = [j for j in range(attempt.n_groups) if j not in still_failing]
        guided.append(select_groups(attempt, solved))
        prefix_steps += [k] * len(solved)
        pending = [g for j, (g, _) in enumerate(tries) if j in still_failing]
    replaced = set(failed) - set(pending)
    keep = select_groups(batch, [g for g in range(batch.n_groups) if g not in replaced])
    metrics.update({"pope/guided_groups": len(prefix_steps), "pope/still_failed_groups": len(pending),
                    "pope/mean_prefix_steps": sum(prefix_steps) / len(prefix_steps) if prefix_steps else 0.0})
    return concat_batches([keep] + [b for b in guided if b.n_groups], source.pad_id), metrics


POPE = register_algorithm(Algorithm(
    name="pope", summary="all-fail groups re-rolled with the shortest helpful oracle-solution prefix in the prompt; "
                         "GRPO on the mix of unguided and guided groups",
    advantage="group_std", policy_loss="clipped_ratio", loss_agg="seq_mean_token_mean", rollout="privileged_guidance",
    needs=("verifier", "solutions"), paper="arXiv:2601.18779",
    defaults={"max_prefix_steps": 3, "clip_eps": 0.2, "beta": 0.0, "adv_eps": 1e-4, "tis_cap": 2.0}))
