"""The second embedded example: a task that is not arithmetic, brought the way a user brings theirs.

    python examples/reverse/prepare.py          # writes examples/reverse/data/ and examples/reverse/model/
    alignflow run --pipeline reverse             # (with `reverse` in pipelines.yaml's `tracked`)

Task: reverse the order of a list of words ("Reverse: river stone apple" -> "apple stone river").
Data, in three of the formats curate reads:
  data/sft.jsonl     chat `messages` (a system prompt on some rows, multi-turn on a few), one malformed line
  data/rl.parquet    columns `question`, `target`, `n_words` (mapped with `columns: {prompt: question, answer: target}`)
  data/eval/         a `datasets` DatasetDict saved with save_to_disk, split `test`
  data/ood.jsonl     TRL prompt/completion rows with one more word than training ever shows
Model: a Qwen2 causal LM with tied embeddings, randomly initialised, and a byte-level BPE tokenizer trained here
with `tokenizers` (ChatML template), saved with save_pretrained: `base.path: examples/reverse/model`.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_model import make_model  # noqa: E402

WORDS = """apple river stone cloud tiger green silver paper window garden yellow orange purple castle forest
candle rabbit monkey pencil bottle mirror ladder hammer basket pillow rocket planet spider dragon winter summer
spring autumn island desert valley meadow harbor bridge tunnel market temple palace cabin engine wagon saddle
anchor feather button carpet doctor farmer singer sailor pirate wizard knight farmer violin guitar trumpet piano
coffee butter cheese bread honey pepper ginger lemon cherry banana melon peach plum grape olive onion carrot potato
tomato turnip salmon turtle falcon parrot beaver badger otter walrus camel donkey horse zebra panda koala lizard
frog snail""".split()
SYSTEM = "You reverse the order of the words you are given. Answer with the words only."


def _problem(rng: random.Random, n: int) -> tuple[str, str]:
    words = rng.sample(WORDS, n)
    return "Reverse: " + " ".join(words), " ".join(reversed(words))


def _unique(rng: random.Random, count: int, sizes: tuple[int, ...], seen: set) -> list[tuple[str, str]]:
    out = []
    while len(out) < count:
        prompt, answer = _problem(rng, rng.choice(sizes))
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, answer))
    return out


def build(out: Path = HERE, n_sft: int = 3000, n_rl: int = 1500, n_eval: int = 200, n_ood: int = 100,
          seed: int = 0, model: bool = True) -> None:
    import datasets
    import pandas as pd
    rng, seen = random.Random(seed), set()
    held_out = {"eval": _unique(rng, n_eval, (3, 4), seen), "ood": _unique(rng, n_ood, (5,), seen)}
    sft, rl = _unique(rng, n_sft, (2, 3, 4), seen), _unique(rng, n_rl, (3, 4), seen)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "sft.jsonl", "w") as fh:
        for i, (prompt, answer) in enumerate(sft):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            if i % 2:  # half the rows carry the system prompt; curate adds it to the rest (curate.system_prompt)
                messages.insert(0, {"role": "system", "content": SYSTEM})
            if i % 10 == 0:  # a few multi-turn chats: the earlier assistant turn is trained on as well
                warm_prompt, warm_answer = _problem(rng, 2)
                messages[-2:-2] = [{"role": "user", "content": warm_prompt}, {"role": "assistant", "content": warm_answer}]
            fh.write(json.dumps({"messages": messages}) + "\n")
        fh.write('{"messages": [{"role": "user", "content": "Reverse: broken row"}\n')  # malformed: quarantined
    pd.DataFrame({"question": [p for p, _ in rl], "target": [a for _, a in rl],
                  "n_words": [len(a.split()) for _, a in rl]}).to_parquet(data / "rl.parquet")
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({
        "prompt": [p for p, _ in held_out["eval"]], "answer": [a for _, a in held_out["eval"]]})}
    ).save_to_disk(str(data / "eval"))
    with open(data / "ood.jsonl", "w") as fh:
        for prompt, answer in held_out["ood"]:
            fh.write(json.dumps({"prompt": prompt, "completion": answer, "answer": answer}) + "\n")
    if model:
        # plus pseudo-words, so the BPE vocabulary has the thousands of entries a real tokenizer's has
        syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]
        filler = [" ".join("".join(rng.choices(syllables, k=rng.randint(2, 4))) for _ in range(12)) for _ in range(4000)]
        texts = [SYSTEM] + [f"{p}\n{a}" for p, a in sft + rl] + filler
        make_model(out / "model", texts, vocab_size=4096, hidden_size=128, layers=4, heads=4, kv_heads=2,
                   intermediate=512, seed=seed)


if __name__ == "__main__":
    build()
    print(f"wrote {HERE / 'data'} and {HERE / 'model'}")
