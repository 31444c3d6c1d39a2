"""A curated split as the stages use it: what rewards see (prompt texts, the dataset's columns) and what the
policy is shown (the chat messages up to the point of generation). Read from the curate stage's Parquet."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TaskRows:
    prompts: list[str]                                   # the last user message of each row (rewards' `prompts`)
    messages: list[list[dict]]                           # the chat shown to the policy, ending with a user turn
    columns: dict[str, list] = field(default_factory=dict)  # every other dataset column, aligned (rewards' kwargs)
    responses: list[str | None] | None = None            # demonstrations, where the split has them

    def __post_init__(self):
        bad = {k: len(v) for k, v in self.columns.items() if len(v) != len(self.prompts)}
        if len(self.messages) != len(self.prompts) or bad:
            raise ValueError(f"TaskRows: {len(self.prompts)} prompts, {len(self.messages)} messages, columns {bad}")

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def from_texts(cls, prompts: list[str], **columns: list) -> "TaskRows":
        """Plain user prompts (one turn each) with columns, e.g. TaskRows.from_texts(prompts, answer=answers)."""
        return cls(list(prompts), [[{"role": "user", "content": p}] for p in prompts], dict(columns))

    @classmethod
    def from_records(cls, records: list[dict]) -> "TaskRows":
        """From curate's normalised rows (messages a list, columns a dict)."""
        keys = sorted({k for r in records for k in (r.get("columns") or {})})
        return cls([r["prompt"] for r in records], [r["messages"] for r in records],
                   {k: [(r.get("columns") or {}).get(k) for r in records] for k in keys},
                   [r.get("response") for r in records])

    @classmethod
    def from_frame(cls, df) -> "TaskRows":
        """From a curated split's DataFrame (`messages` and `columns` are JSON strings there)."""
        prompts = df["prompt"].tolist()
        if "messages" in df:
            messages = [json.loads(m) if isinstance(m, str) else [{"role": "user", "content": p}]
                        for m, p in zip(df["messages"], prompts)]
        else:
            messages = [[{"role": "user", "content": p}] for p in prompts]
        if "columns" in df:
            per_row = [json.loads(c) if isinstance(c, str) else {} for c in df["columns"]]
        else:
            per_row = [{"answer": a} if isinstance(a, str) else {} for a in df.get("answer", [None] * len(prompts))]
        keys = sorted({k for row in per_row for k in row})
        columns = {k: [row.get(k) for row in per_row] for k in keys}
        # pandas reads a missing string as NaN: a row without a demonstration is None here
        responses = [r if isinstance(r, str) else None for r in df["response"]] if "response" in df else None
        return cls(prompts, messages, columns, responses)

    def take(self, index: list[int]) -> "TaskRows":
        return TaskRows([self.prompts[i] for i in index], [self.messages[i] for i in index],
                        {k: [v[i] for i in index] for k, v in self.columns.items()},
                        [self.responses[i] for i in index] if self.responses is not None else None)

    def repeat(self, n: int) -> "TaskRows":
        """Each row n times in a row (prompt-major, as engines return n completions per prompt)."""
        return self.take([i for i in range(len(self)) for _ in range(n)])

    def column(self, name: str) -> list:
        if name not in self.columns:
            raise KeyError(f"no column {name!r} in the data (columns: {sorted(self.columns) or 'none'})")
        return self.columns[name]


def read_rows(curated: Path, split: str) -> TaskRows:
    from alignflow.stage import read_split
    return TaskRows.from_frame(read_split(curated, split))
