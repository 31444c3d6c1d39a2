"""The reverse-the-words task's own rewards, in TRL's convention: `(prompts, completions, **columns) -> list`.
The data's `answer` column (mapped from the Parquet file's `target`) holds the words in reversed order."""


def _words(text) -> list[str]:
    return str(text).lower().replace(",", " ").split()


def reversed_exactly(prompts, completions, answer, **_):
    """1.0 when the completion is exactly the reversed word list (case and spacing aside), else 0.0."""
    return [float(_words(c) == _words(a)) if a is not None else None for c, a in zip(completions, answer)]


def position_credit(prompts, completions, answer, **_):
    """Partial credit: the share of positions holding the right word, with a wrong length costing the
    missing or extra positions (so printing the input unchanged scores only where it happens to match)."""
    out = []
    for completion, target in zip(completions, answer):
        if target is None:
            out.append(None)
            continue
        got, want = _words(completion), _words(target)
        hits = sum(g == w for g, w in zip(got, want))
        out.append(hits / max(len(got), len(want), 1))
    return out
