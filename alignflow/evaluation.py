"""Scoring a policy on a prompt set with the pipeline's reward (a weighted sum of named functions) and metrics.

Per split `evaluate` reports each metric's greedy mean and, from k samples per prompt at T = 1, mean@k (the mean
over all samples) and pass@k (the mean over prompts of the best of the k samples: for a 0/1 metric exactly the
share of prompts solved at least once)."""
from __future__ import annotations

import numpy as np

from alignflow.data.rows import TaskRows
from alignflow.models import chat_prompt
from alignflow.rollout import Sampling, TransformersEngine


def score(model, tokenizer, rows: TaskRows, reward, *, metrics=None, max_new_tokens: int = 32, greedy: bool = True,
          n: int = 1, temperature: float = 1.0, batch_size: int = 500) -> dict:
    """`n` completions per row (prompt-major) scored by `reward` (a RewardSet) and, per function, by `metrics`
    (another RewardSet; default: the reward's own functions):
    {"value": mean weighted reward, "rewards": per-sample totals, "per_function": {label: [value | None]},
     "errors": {label: count}, "texts": completions}."""
    engine = TransformersEngine(model, tokenizer)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy)
    totals, texts, errors = [], [], {}
    per_function: dict[str, list] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows.take(list(range(start, min(start + batch_size, len(rows)))))
        out = engine.generate([chat_prompt(tokenizer, m) for m in chunk.messages], n, sampling)
        rep = chunk.repeat(n)
        result = reward(rep.prompts, out.texts, rep.columns)
        measured = result if metrics is None or metrics is reward else metrics(rep.prompts, out.texts, rep.columns)
        totals += result.total
        texts += out.texts
        for label, values in measured.per_function.items():
            per_function.setdefault(label, []).extend(values)
        for res in {id(result): result, id(measured): measured}.values():
            for label, count in res.errors.items():
                errors[label] = errors.get(label, 0) + count
    totals_arr = np.asarray(totals, dtype=float)
    return {"value": float(totals_arr.mean()) if len(totals_arr) else 0.0, "rewards": totals_arr,
            "per_function": per_function, "errors": errors, "texts": texts}


def _mean(values) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def metric_summary(per_function: dict[str, list], n: int, greedy: bool) -> dict[str, dict]:
    """{label: {"greedy": mean}} or, for n samples per prompt, {label: {"mean@n", "pass@n"}}. None marks a metric
    that applied to no sample."""
    out = {}
    for label, values in per_function.items():
        if greedy:
            out[label] = {"greedy": _mean(values)}
            continue
        best = [max((v for v in values[i:i + n] if v is not None), default=None) for i in range(0, len(values), n)]
        out[label] = {f"mean@{n}": _mean(values), f"pass@{n}": _mean(best)}
    return out
