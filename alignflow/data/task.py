"""The embedded default task: addition with worked column steps, generated from a seed.

    prompt   "47+85=?"
    response "7+5=12;4+8+1=13;A:132"

Splits (disjoint operand pairs): sft demonstrations, rl prompts, logged prompts, eval (training
distribution), ood (harder sums: both operands in 50..99, so every sum carries into a new digit, a tail that
is a quarter of the training distribution's two-digit sums; a phrasing shift such as "what is 47+85=?" or longer
operands leaves a model this small at ~0-3% at every stage, which measures nothing, RECIPES §9), real (the same
sums phrased as people write them, "47 plus 85=?", "what is 47 plus 85", "47 + 85 =?": unlabelled, the
answers kept apart for measuring true values only), and the raw pre-training corpus, which phrases sums both
ways so the base model has seen those words.
"""
from __future__ import annotations

import random
import re

ANSWER_RE = re.compile(r"A:(-?\d+)\s*$")


def worked_steps(a: int, b: int) -> str:
    """Column addition from the right; a missing digit is written as 0, the carry as a third term."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total}" if carry else f"{x}+{y}={total}")
        carry = total // 10
    return ";".join(steps) + f";A:{a + b}"


def prompt_of(a: int, b: int) -> str:
    return f"{a}+{b}=?"


OOD_RANGE = (50, 99)   # both operands of an ood sum
REAL_PHRASINGS = ("{a} plus {b}=?", "what is {a} plus {b}", "{a} + {b} =?")


def real_prompt_of(a: int, b: int, rng: random.Random) -> str:
    """The 'real' traffic: the same sums asked the ways people write them (words the base model has read)."""
    return rng.choice(REAL_PHRASINGS).format(a=a, b=b)


def extract_answer(completion: str) -> str | None:
    match = ANSWER_RE.search(completion.strip())
    return match.group(1) if match else None


def _pair(rng: random.Random, max_digits: int, long_digits: int, long_share: float) -> tuple[int, int]:
    """Operands uniform below 10**max_digits (or both exactly `long_digits` long, with prob. long_share).
    Uniform, not "choose a length, then a number": that would make a quarter of the sums 1-digit + 1-digit,
    a space of only 100 pairs that the held-out splits, drawn first, would use up, leaving the training
    splits none of them."""
    if rng.random() < long_share:
        low = 10 ** (long_digits - 1)
        return rng.randint(low, 10 * low - 1), rng.randint(low, 10 * low - 1)
    return rng.randint(0, 10**max_digits - 1), rng.randint(0, 10**max_digits - 1)


def generate(seed: int = 0, n_sft: int = 4000, n_rl: int = 2000, n_logged: int = 500, n_eval: int = 500,
             n_ood: int = 500, n_real: int = 300, max_digits: int = 2, long_digits: int = 3,
             long_share: float = 0.15, n_corpus: int = 40000) -> dict[str, list[dict]]:
    """Rows per split: {"prompt", "response", "answer"} (response None where the split has no demonstration)."""
    rng = random.Random(seed)
    used: set[tuple[int, int]] = set()

    def draw(n: int, pair_of=lambda: _pair(rng, max_digits, long_digits, long_share)) -> list[tuple[int, int]]:
        pairs: list[tuple[int, int]] = []
        for _ in range(n * 50):
            if len(pairs) == n:
                break
            pair = pair_of()
            if pair not in used:
                used.add(pair)
                pairs.append(pair)
        return pairs  # fewer than n only when the distribution runs out of unique pairs

    harder = lambda: (rng.randint(*OOD_RANGE), rng.randint(*OOD_RANGE))  # noqa: E731
    held_out = {"eval": draw(n_eval), "ood": draw(n_ood, harder), "real": draw(n_real), "logged": draw(n_logged)}
    train = {"sft": draw(n_sft), "rl": draw(n_rl)}

    def labelled(pairs, with_response: bool, phrase=None) -> list[dict]:
        return [{"prompt": phrase(a, b) if phrase else prompt_of(a, b),
                 "response": worked_steps(a, b) if with_response else None,
                 "answer": str(a + b)} for a, b in pairs]

    splits = {"sft": labelled(train["sft"], True), "rl": labelled(train["rl"], False),
              "logged": labelled(held_out["logged"], False), "eval": labelled(held_out["eval"], False),
              "ood": labelled(held_out["ood"], False),
              "real": labelled(held_out["real"], False, lambda a, b: real_prompt_of(a, b, rng))}
    # Pre-training text: bare sums in both phrasings over pairs outside every held-out split.
    held_out_pairs = {pair for pairs in held_out.values() for pair in pairs}
    corpus = []
    while len(corpus) < n_corpus:
        a, b = _pair(rng, long_digits, long_digits, 0.0)
        if (a, b) in held_out_pairs:
            continue
        corpus.append(f"{a}+{b}={a + b}" if rng.random() < 0.7 else f"{a} plus {b} is {a + b}")
    splits["corpus"] = [{"prompt": text, "response": None, "answer": None} for text in corpus]
    return splits


HARD_RANGE = (100, 999)  # both operands of a hard sum (POPE's hard split)


def hard_split(seed: int = 0, n_train: int = 400, n_eval: int = 200, exclude: set[str] = frozenset()) -> dict:
    """POPE's hard split: sums of two 3-digit operands, which the tiny default's SFT model rarely solves, so most
    GRPO groups on them are all-zero. {"train": rows, "eval": rows} with the worked solution as "response" (POPE's
    privileged prefix), disjoint from each other and from the prompts in `exclude` (e.g. every curated split)."""
    rng = random.Random(f"hard-{seed}")
    seen, pairs = set(exclude), []
    while len(pairs) < n_train + n_eval:
        a, b = rng.randint(*HARD_RANGE), rng.randint(*HARD_RANGE)
        if prompt_of(a, b) not in seen:
            seen.add(prompt_of(a, b))
            pairs.append((a, b))
    rows = [{"prompt": prompt_of(a, b), "response": worked_steps(a, b), "answer": str(a + b)} for a, b in pairs]
    return {"train": rows[:n_train], "eval": rows[n_train:]}
