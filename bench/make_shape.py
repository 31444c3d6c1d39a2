"""Build a user-shaped checkpoint with random weights: Qwen2.5-0.5B's or 1.5B's exact config (vocabulary 151,936,
tied embeddings) plus a byte-level BPE tokenizer with a ChatML template, saved with save_pretrained, then loaded
back through `models.load` exactly as a pipeline's `base.path` loads a user's checkpoint (issue 18).

The device machines have no weights and no network, so the shapes are built there (a few seconds on the GPU).
The tokenizer: byte-level BPE trained with `tokenizers` on the arithmetic generator's text (plus a little English),
Qwen2's pre-tokenizer (digits split one by one),
its vocabulary filled with unreachable `<|extra_i|>` entries up to Qwen2.5's 151,643 regular tokens, then Qwen's
special tokens <|endoftext|> = 151643, <|im_start|> = 151644, <|im_end|> = 151645 (the model's embedding has
151,936 rows, as Qwen's: the last 290 belong to no token). Random init (transformers' default, std 0.02), saved
in bf16 like the released checkpoints.

    python bench/make_shape.py --shape 0.5b --out models/shapes/qwen2.5-0.5b [--device cuda]
    python bench/make_shape.py --shape 1.5b --out models/shapes/qwen2.5-1.5b --device cuda
    python bench/make_shape.py --shape 7b --out models/shapes/qwen2.5-7b --device cuda --no-check   # 15 GB bf16
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Qwen2.5 configs as released (config.json of Qwen/Qwen2.5-0.5B and -1.5B); "test" is a small CPU check.
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
    # Qwen2.5-7B: untied lm_head and a 152,064-row vocabulary (its config.json); 7.6 B parameters, ~122 GB of fp32
    # weights + gradients + AdamW state: more than one H100 holds, the shape FSDP is for (issue 20)
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "test": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
VOCAB = 151936            # embedding rows (Qwen2.5)
REGULAR = 151643          # regular (BPE) tokens; specials follow
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def corpus_text(n: int = 20000, seed: int = 0) -> list[str]:
    """Lines the tokenizer is trained on: the arithmetic task's prompts and worked answers, plus some words."""
    from alignflow.data.task import generate
    rows = generate(seed=seed, n_sft=n, n_rl=10, n_logged=10, n_eval=10, n_ood=10, n_real=10, n_corpus=10)["sft"]
    words = ("user assistant system the of and to in is you that it he was for on are as with his they at be this "
             "have from or one had by "
             "word but not what all were we when your can said there use an each which she do how their if will up "
             "other about out many then them these so some her would make like him into time has look two more").split()
    rng = random.Random(seed)
    english = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) for _ in range(n // 4)]
    return [f"{r['prompt']} {r['response']}" for r in rows] + english


def qwen_pre_tokenizer():
    """Qwen2's pre-tokenizer (its tokenizer.json): the GPT-4-style split with every digit on its own, then bytes."""
    from tokenizers import Regex, pre_tokenizers
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def build_tokenizer(train_vocab: int = 8000):
    from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(tk_models.BPE())
    bpe.pre_tokenizer = qwen_pre_tokenizer()
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=train_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(corpus_text(), trainer)
    spec = json.loads(bpe.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    for i in range(REGULAR - len(vocab)):  # unreachable entries (no merge produces them), as in a large vocabulary
        vocab[f"<|extra_{i}|>"] = len(vocab)
    assert len(vocab) == REGULAR
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    full = Tokenizer(tk_models.BPE(vocab=vocab, merges=merges))
    full.pre_tokenizer = qwen_pre_tokenizer()
    full.decoder = decoders.ByteLevel()
    full.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=full, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token=None, model_max_length=32768)
    tok.chat_template = CHATML
    assert tok.convert_tokens_to_ids(SPECIALS) == [REGULAR, REGULAR + 1, REGULAR + 2]
    return tok


def build_model(shape: str, device: str):
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    kw = {**dict(vocab_size=VOCAB, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                 bos_token_id=REGULAR, eos_token_id=REGULAR + 2, pad_token_id=REGULAR, use_sliding_window=False,
                 max_window_layers=SHAPES[shape]["num_hidden_layers"], attention_dropout=0.0, hidden_act="silu",
                 initializer_range=0.02), **SHAPES[shape]}
    try:
        cfg = Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **kw)
    except Exception:  # noqa: BLE001  (older transformers)
        cfg = Qwen2Config(rope_theta=1000000.0, **kw)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=REGULAR, eos_token_id=[REGULAR + 2, REGULAR],
                                               pad_token_id=REGULAR)
    return model.to(torch.bfloat16)


def make(shape: str, out: Path, device: str = "cpu", check_load: bool = True) -> dict:
    """Build, save and (check_load) load back through models.load. -> facts about the checkpoint"""
    t0 = time.perf_counter()
    tok = build_tokenizer()
    model = build_model(shape, device)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    facts = {"shape": f"qwen2.5-{shape}", "path": str(out), "vocab_size": model.config.vocab_size,
             "tokenizer_len": len(tok), "parameters": sum(p.numel() for p in model.parameters()),
             "tied_embeddings": model.config.tie_word_embeddings, "build_s": round(time.perf_counter() - t0, 1)}
    del model
    if check_load:
        from alignflow import models
        t = time.perf_counter()
        report = models.check_model(out)
        loaded, ltok = models.load(out)
        facts.update(load_s=round(time.perf_counter() - t, 1),
                     loaded_parameters=sum(p.numel() for p in loaded.parameters()),
                     eos_ids=models.eos_ids(loaded, ltok),
                     chat_prompt=models.chat_prompt(ltok, "12+34=?"),
                     check_model=report if isinstance(report, (dict, str, list)) else repr(report))
        assert facts["loaded_parameters"] == facts["parameters"], facts
    return facts


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    print(json.dumps(make(args.shape, args.out, args.device, not args.no_check), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
