"""Build a small local checkpoint the way users have them: a Qwen2 causal LM with tied embeddings, a byte-level BPE
tokenizer trained here with `tokenizers`, and a ChatML chat template (Qwen2 style). Nothing is downloaded.

    python examples/reverse/make_model.py OUT_DIR --texts-from data.jsonl [--vocab-size 2000 ...]

The tokenizer is trained on every string found in the JSONL rows (plain fields and chat `messages` contents).
Importing this file does nothing; `make_model(...)` builds and saves.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def train_tokenizer(texts, vocab_size: int = 2000):
    """Byte-level BPE (GPT-2 / Qwen2 style) trained on `texts`, wrapped as a transformers tokenizer with eos
    <|im_end|>, pad <|endoftext|> and the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    role_words = ["system\n", "user\n", "assistant\n"]   # the template's own text gets merged tokens too
    tok.train_from_iterator(list(texts) + role_words * 50, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 model_input_names=["input_ids", "attention_mask"])
    hf.chat_template = CHATML_TEMPLATE
    return hf


def make_model(out_dir, texts, vocab_size: int = 2000, hidden_size: int = 128, layers: int = 4, heads: int = 4,
               kv_heads: int = 2, intermediate: int = 512, seed: int = 0, max_positions: int = 512) -> Path:
    """Train the tokenizer on `texts`, build a randomly initialised Qwen2ForCausalLM (tie_word_embeddings=True,
    generation_config.eos_token_id = [<|im_end|>, <|endoftext|>]) and save both into `out_dir`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(texts, vocab_size)
    im_end, endoftext = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=im_end, pad_token_id=endoftext)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = [im_end, endoftext]
    model.generation_config.pad_token_id = endoftext
    model.generation_config.bos_token_id = None
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def texts_from_jsonl(path) -> list[str]:
    """Every string in every row of a JSONL file (nested lists/dicts included: chat messages' contents)."""
    out: list[str] = []

    def walk(value) -> None:
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    with open(path) as fh:
        for line in fh:
            if line.strip():
                walk(json.loads(line))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--texts-from", required=True, action="append", help="a JSONL file (repeatable)")
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    texts = [t for f in args.texts_from for t in texts_from_jsonl(f)]
    if not texts:
        parser.error(f"no strings found in {args.texts_from}")
    out = make_model(args.out_dir, texts, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                     layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, intermediate=args.intermediate,
                     seed=args.seed)
    print(f"saved {out} (tokenizer trained on {len(texts)} strings)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
