"""Scoring a policy on a prompt set: greedy accuracy, steps-consistent rate, sampled value."""
from __future__ import annotations

import numpy as np

from alignflow.models import chat_prompt
from alignflow.rewards import accuracy_reward, steps_consistent
from alignflow.rollout import Sampling, TransformersEngine


def score(model, tokenizer, prompts: list[str], answers: list[str], *, max_new_tokens: int = 32,
          greedy: bool = True, n: int = 1, temperature: float = 1.0, batch_size: int = 500) -> dict:
    """Per-sample rewards and steps-consistency of `n` completions per prompt (prompt-major)."""
    engine = TransformersEngine(model, tokenizer)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy)
    rewards, steps, texts = [], [], []
    for i in range(0, len(prompts), batch_size):
        chunk_p, chunk_a = prompts[i:i + batch_size], answers[i:i + batch_size]
        out = engine.generate([chat_prompt(tokenizer, p) for p in chunk_p], n, sampling)
        rep_p = [p for p in chunk_p for _ in range(n)]
        rep_a = [a for a in chunk_a for _ in range(n)]
        rewards += accuracy_reward(rep_p, out.texts, answer=rep_a)
        steps += steps_consistent(rep_p, out.texts)
        texts += out.texts
    rewards_arr = np.array(rewards)
    return {"accuracy": float(rewards_arr.mean()) if len(rewards_arr) else 0.0,
            "steps_consistent": float(np.mean(steps)) if steps else 0.0,
            "rewards": rewards_arr, "texts": texts}
