"""Reward functions in TRL's convention: `(prompts, completions, **kwargs) -> list[float]`; dataset columns
arrive as keyword arguments (here `answer`). A user's own function plugs in the same way."""
from __future__ import annotations

import logging

from alignflow.data.task import extract_answer, worked_steps

log = logging.getLogger(__name__)


def accuracy_reward(prompts: list[str], completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1.0 when the completion ends with `A:<the right answer>`, else 0.0.

    >>> accuracy_reward(["1+2=?"], ["1+2=3;A:3"], answer=["3"])
    [1.0]
    """
    return [float(extract_answer(c) == str(a)) for c, a in zip(completions, answer)]


def steps_consistent(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """1.0 when the worked steps are exactly the column steps of the sum in the prompt (not just the answer)."""
    out = []
    for prompt, completion in zip(prompts, completions):
        try:
            a, b = (int(x) for x in prompt.removesuffix("=?").split("+"))
        except ValueError:
            out.append(0.0)
            continue
        out.append(float(completion.strip() == worked_steps(a, b)))
    return out


def safe_rewards(fn, prompts, completions, **kwargs) -> tuple[list[float], int]:
    """Call a reward function; an exception counts as a reward error for each sample (reward 0), not a crash."""
    try:
        return [float(r) for r in fn(prompts, completions, **kwargs)], 0
    except Exception as err:  # a user's reward function may fail on odd completions
        log.warning("reward function %s failed on a batch (%s); scoring it sample by sample", fn.__name__, err)
    rewards, errors = [], 0
    for i, completion in enumerate(completions):
        try:
            rewards.append(float(fn([prompts[i]], [completion], **{k: [v[i]] for k, v in kwargs.items()})[0]))
        except Exception:
            rewards.append(0.0)
            errors += 1
    return rewards, errors
