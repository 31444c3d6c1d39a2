"""Models and tokenizers: built locally for the embedded default, loaded from a local path otherwise.

The tiny default is a real Qwen2 architecture with a character-level tokenizer, saved with
`save_pretrained`, so `load` is exactly the code that loads a real checkpoint.
"""
from __future__ import annotations

import os
import string
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as transformers_logging

from alignflow.config import TinyModelConfig

transformers_logging.disable_progress_bar()  # "Loading weights" bars on every load drown the stage's own progress

SPECIAL = ["<pad>", "<|user|>", "<|assistant|>", "<|end|>"]
ALPHABET = string.digits + "+-=?:;A " + string.ascii_lowercase
# One token per role marker keeps prompts short; the template is the same one `apply_chat_template` uses.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level WordLevel tokenizer (digits stay single tokens: column arithmetic needs them)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|end|>",
                                     model_input_names=["input_ids", "attention_mask"])
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def build_tiny_model(tokenizer, shape: TinyModelConfig, max_positions: int = 256) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=False,  # untied: vLLM's weight reload handles it without a custom head (RECIPES §8)
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (the trainer's log-probs) on tensor cores
    return torch.device(device)


def load(path: str | Path, device: str = "cpu", dtype: str = "fp32", trust_remote_code: bool = False):
    """(model, tokenizer) from a local save_pretrained directory; safetensors only, remote code off by default."""
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32,
                                                 use_safetensors=True, trust_remote_code=trust_remote_code,
                                                 attn_implementation="sdpa")
    return model.to(resolve_device(device)), tokenizer


def autocast(device: str, precision: str):
    """bf16 autocast on CUDA when asked (fp32 master weights stay); a no-op otherwise."""
    import contextlib
    if precision == "bf16" and resolve_device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def save(model, tokenizer, path: str | Path) -> None:
    """save_pretrained into a temporary sibling, then rename: a half-written model is never seen. A LoRA model is
    saved merged (a plain transformers checkpoint)."""
    from alignflow.train import lora
    model = lora.merged(model)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        import shutil
        shutil.rmtree(path)
    os.replace(tmp, path)


def chat_prompt(tokenizer, user_content: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": user_content}], tokenize=False,
                                         add_generation_prompt=True)
