"""Models and tokenizers: built locally for the embedded default, loaded from a local path otherwise.

The tiny default is a real Qwen2 architecture with a character-level tokenizer, saved with
`save_pretrained`, so `load` is exactly the code that loads a real checkpoint.

Users' checkpoints (issue 15): `check_model` pre-flights a directory without loading weights (ModelError names the
path and the problem); `load` applies the chat-template override / plain fallback and the pad -> eos fallback;
`chat_prompt` renders a str or a message list exactly as the template does, and every rendered text is tokenised
with add_special_tokens=False (`encode_prompts`, `sft_examples`), so BOS appears only where the template
writes it; `eos_ids` is the stop set (the tokenizer's eos and generation_config's) every engine stops on.
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

IGNORE = -100  # the label of a position the loss skips (prompt tokens, padding)


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


class ModelError(ValueError):
    """A model directory that cannot be used, found before any stage runs; str() names the path and the problem."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"model {self.path}: {problem}")


# The fallback for a tokenizer without a chat template: system text, then "User: ...\nAssistant: ..." turns, each
# assistant turn ending with the eos token (so SFT teaches the model to stop).
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")

_SOURCE_ATTR = "_alignflow_template_source"
_PAD_ATTR = "_alignflow_pad_fallback"


def template_source(tokenizer) -> str:
    """Where the tokenizer's chat template came from: "tokenizer" (its own), "override" (base.chat_template given as
    a string), "file:<path>" (a .jinja file) or "fallback" (PLAIN_CHAT_TEMPLATE, the tokenizer had none)."""
    return getattr(tokenizer, _SOURCE_ATTR, "tokenizer")


def pad_fallback_used(tokenizer) -> bool:
    """True when the tokenizer had no pad token and `prepare_tokenizer` made eos the pad."""
    return bool(getattr(tokenizer, _PAD_ATTR, False))


def _read_template(chat_template: str, path) -> tuple[str, str]:
    """(template text, source) for a base.chat_template value: a .jinja file path or the template itself."""
    candidate = Path(chat_template).expanduser() if "\n" not in chat_template and len(chat_template) < 1024 else None
    try:
        is_file = candidate is not None and candidate.is_file()
    except OSError:
        is_file = False
    if candidate is not None and (chat_template.endswith(".jinja") or is_file):
        if not candidate.is_file():
            raise ModelError(path, f"chat_template file {chat_template} does not exist")
        return candidate.read_text(), f"file:{candidate}"
    return chat_template, "override"


def _generation_eos(generation_config) -> list[int]:
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _eos_list(tokenizer, generation_config) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer is not None and tokenizer.eos_token_id is not None else []
    ids += _generation_eos(generation_config)
    return list(dict.fromkeys(int(i) for i in ids))


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: tokenizer.eos_token_id, then generation_config.eos_token_id (int or list),
    without duplicates. Either argument may be None."""
    return _eos_list(tokenizer, getattr(model, "generation_config", None) if model is not None else None)


def prepare_tokenizer(tokenizer, path="<tokenizer>", chat_template: str | None = None, generation_config=None):
    """In place: the chat_template override (string or .jinja path), the plain fallback template when the tokenizer
    has none, eos from generation_config when the tokenizer has none, and pad falling back to eos."""
    if chat_template:
        tokenizer.chat_template, source = _read_template(chat_template, path)
    elif getattr(tokenizer, "chat_template", None):
        source = "tokenizer"
    else:
        tokenizer.chat_template, source = PLAIN_CHAT_TEMPLATE, "fallback"
    setattr(tokenizer, _SOURCE_ATTR, source)
    if tokenizer.eos_token is None:
        gen_eos = _generation_eos(generation_config)
        if not gen_eos:
            raise ModelError(path, "no eos token: the tokenizer has none and generation_config.eos_token_id is "
                                   "unset, so a completion could never end")
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(gen_eos[0])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        setattr(tokenizer, _PAD_ATTR, True)
    return tokenizer


def _weight_files(path: Path) -> tuple[list[Path], list[Path]]:
    safetensors = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.safetensors.index.json"))
    pickles = sorted(path.glob("*.bin")) + sorted(path.glob("*.bin.index.json"))
    return safetensors, pickles


def _check_files(path: Path, allow_pickle: bool) -> str:
    """The checks that need no loading: directory, config.json, weights. -> "safetensors" or "bin"."""
    if not path.is_dir():
        raise ModelError(path, "no such directory (a save_pretrained model directory is expected)")
    if not (path / "config.json").is_file():
        raise ModelError(path, "no config.json (a save_pretrained model directory is expected)")
    safetensors, pickles = _weight_files(path)
    if safetensors:
        return "safetensors"
    if pickles:
        if not allow_pickle:
            raise ModelError(path, f"only pickle weights ({pickles[0].name}); set base.allow_pickle: true to load "
                                   "pickle weights, which can run code (or convert them to safetensors)")
        return "bin"
    raise ModelError(path, "no weights (no *.safetensors or model.safetensors.index.json; pickle *.bin only with "
                           "base.allow_pickle: true)")


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _auto_tokenizer(path: Path, trust_remote_code: bool):
    """The tokenizer exactly as saved. A generic tokenizers-backed one (tokenizer_config's tokenizer_class
    TokenizersBackend / PreTrainedTokenizerFast, as `tokenizers`-built ones are saved) is loaded as such: through
    AutoTokenizer, transformers 5 would build config.json's model class instead (Qwen2Tokenizer for a qwen2 model),
    replacing the saved pre-tokenizer and model (the tiny tokenizer then lost its spaces) and adding that class's
    default special tokens (an unk <|endoftext|> past the embeddings)."""
    import json
    config = path / "tokenizer_config.json"
    try:
        cls = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    except ValueError:
        cls = None
    if cls in GENERIC_TOKENIZER_CLASSES and (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, chat_template: str | None = None,
                   generation_config=None):
    """The tokenizer of a model directory with the chat-template override / fallback and the pad fallback applied."""
    path = Path(path)
    tokenizer = _auto_tokenizer(path, trust_remote_code)
    if generation_config is None:
        generation_config = _generation_config(path)
    return prepare_tokenizer(tokenizer, path, chat_template, generation_config)


def _generation_config(path: Path):
    from transformers import GenerationConfig
    try:
        return GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None


def load(path: str | Path, device: str = "cpu", dtype: str = "fp32", trust_remote_code: bool = False,
         allow_pickle: bool = False, chat_template: str | None = None):
    """(model, tokenizer) from a local save_pretrained directory: safetensors only unless `allow_pickle`, remote code
    off by default; `chat_template` (a template string or a .jinja path) replaces the tokenizer's; a tokenizer
    without a template gets PLAIN_CHAT_TEMPLATE (see `template_source`); a missing pad token falls back to eos
    (on the tokenizer, model.config and generation_config)."""
    path = Path(path)
    kind = _check_files(path, allow_pickle)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32,
                                                 use_safetensors=kind == "safetensors",
                                                 trust_remote_code=trust_remote_code, attn_implementation="sdpa")
    tokenizer = _auto_tokenizer(path, trust_remote_code)
    prepare_tokenizer(tokenizer, path, chat_template, model.generation_config)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelError(path, f"tokenizer has {len(tokenizer)} tokens but the model's input embeddings only {rows} "
                               "rows (resize the embeddings or use the model's own tokenizer)")
    if model.config.pad_token_id is None or pad_fallback_used(tokenizer):
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(resolve_device(device)), tokenizer


def autocast(device: str, precision: str):
    """bf16 autocast on CUDA when asked (fp32 master weights stay); a no-op otherwise."""
    import contextlib
    if precision == "bf16" and resolve_device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def save(model, tokenizer, path: str | Path) -> None:
    """save_pretrained into a temporary sibling, then rename: a half-written model is never seen. A LoRA model is
    saved merged (a plain transformers checkpoint). Under torchrun rank 0 writes; a sharded model (FSDP) is first
    gathered whole to it, so every rank calls this and the next stage loads the same layout as from one process."""
    from alignflow import lora
    from alignflow.train import distributed, sharding
    state_dict = sharding.full_state_dict(model) if sharding.is_sharded(model) else None   # a collective
    if not distributed.is_main():
        return
    model = lora.merged(model)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        import shutil
        shutil.rmtree(path)
    os.replace(tmp, path)


def to_messages(prompt, system: str | None = None) -> list[dict]:
    """A prompt as chat messages: a str is one user turn; a list of {role, content} is kept (copied). `system` is
    prepended as a system turn when the messages have none."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} of {prompt!r} is not a {{role, content}} mapping")
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_prompt(tokenizer, prompt, system: str | None = None) -> str:
    """The generation prompt text exactly as the chat template renders it (BOS only if the template writes it).
    `prompt`: a str (one user turn) or a list of {role, content} messages. Tokenise it with
    add_special_tokens=False (`encode_prompts`), never with the tokenizer's defaults."""
    return render(tokenizer, to_messages(prompt, system), add_generation_prompt=True)


def encode_prompts(tokenizer, texts: list[str], device=None) -> dict:
    """Rendered prompt texts -> {"input_ids", "attention_mask"} [B, P], left-padded, add_special_tokens=False."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max((len(row) for row in ids), default=0)
    input_ids = torch.full((len(ids), width), pad if pad is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    if device is not None:
        input_ids, mask = input_ids.to(device), mask.to(device)
    return {"input_ids": input_ids, "attention_mask": mask}


def after_stop(completion: torch.Tensor, stop_ids) -> torch.Tensor:
    """[B, T] bool: True on positions AFTER the first token of each row that is any of `stop_ids` (the stop token
    itself stays generated)."""
    stops = torch.as_tensor(list(stop_ids), dtype=completion.dtype, device=completion.device)
    is_stop = (completion[..., None] == stops).any(-1)   # [B, T]; all False when there are no stop ids
    return (is_stop.cumsum(-1) - is_stop.long()) > 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _safetensors_parameters(path: Path) -> int | None:
    import json
    import struct
    total = 0
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for d in info["shape"]:
                    count *= d
                total += count
    return total


def check_model(path: str | Path, *, trust_remote_code: bool = False, allow_pickle: bool = False,
                chat_template: str | None = None, sample=None) -> dict:
    """Pre-flight a model directory without loading its weights: raises ModelError(path, problem) for no such
    directory, no config.json, a config that is not a causal LM transformers knows, no weights, pickle-only weights
    without `allow_pickle`, a tokenizer that fails to load, a tokenizer larger than the model's vocabulary, a chat
    template that fails to render `sample` (default: one short user turn) or to render it incrementally for SFT.
    Returns a summary: architecture, parameters, vocab sizes, eos ids, pad fallback, template source, sample prompt."""
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    path = Path(path)
    weights = _check_files(path, allow_pickle)
    import json
    try:
        raw = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise ModelError(path, f"config.json is not valid JSON ({e})") from None
    model_type, architectures = raw.get("model_type"), raw.get("architectures") or []
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure here is the config's problem
        raise ModelError(path, f"config.json (model_type {model_type!r}, architectures {architectures}) is not a "
                               f"model transformers knows: {_first_line(e)}") from None
    remote_causal = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote_causal:
        raise ModelError(path, f"config.json describes model_type {config.model_type!r} (architectures "
                               f"{architectures}), which is not a causal language model transformers knows")
    try:
        generation_config = GenerationConfig.from_model_config(config)
        if (path / "generation_config.json").exists():
            generation_config = GenerationConfig.from_pretrained(path)
    except Exception:  # noqa: BLE001
        generation_config = None
    try:
        tokenizer = _auto_tokenizer(path, trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise ModelError(path, f"tokenizer failed to load: {_first_line(e)}") from None
    prepare_tokenizer(tokenizer, path, chat_template, generation_config)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_vocab = getattr(text_config, "vocab_size", None)
    if model_vocab is not None and len(tokenizer) > model_vocab:
        raise ModelError(path, f"tokenizer has {len(tokenizer)} tokens but the model's embeddings only {model_vocab} "
                               "(config vocab_size): ids past it would index outside the embeddings")
    sample = "Hello" if sample is None else sample
    source = template_source(tokenizer)
    try:
        prompt = chat_prompt(tokenizer, sample)
        sft_examples(tokenizer, [sample], ["ok"], stop_ids=_eos_list(tokenizer, generation_config))
    except Exception as e:  # noqa: BLE001 - jinja errors, raise_exception(), the SFT prefix check
        raise ModelError(path, f"chat template ({source}) fails on a sample prompt: "
                               f"{_first_line(e)}") from None
    parameters = _safetensors_parameters(path) if weights == "safetensors" else None
    if parameters is None:
        with torch.device("meta"):
            parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(
                config, trust_remote_code=trust_remote_code).parameters())
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return {"path": str(path), "model_type": config.model_type,
            "architecture": (architectures or [config.model_type])[0], "parameters": int(parameters),
            "weights": weights, "tied_embeddings": bool(getattr(text_config, "tie_word_embeddings", False)),
            "model_vocab_size": model_vocab, "tokenizer_vocab_size": len(tokenizer),
            "eos_ids": _eos_list(tokenizer, generation_config), "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token, "pad_fallback": pad_fallback_used(tokenizer),
            "bos_in_prompt": tokenizer.bos_token_id is not None and tokenizer.bos_token_id in ids[:1],
            "template_source": source, "sample_prompt": prompt, "sample_prompt_tokens": len(ids)}


def sft_examples(tokenizer, conversations: list, responses: list[str], stop_ids=None,
                 system: str | None = None) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per conversation, rendered by the tokenizer's chat template.

    conversations[i]: a str (one user turn) or a list of {role, content} messages (system / user / assistant turns,
    multi-turn allowed) ending with a user turn; responses[i]: the final assistant reply. Labels are on EVERY
    assistant turn's tokens up to and including the first stop token (`stop_ids`, default the tokenizer's eos; pass
    `models.eos_ids(model, tokenizer)` so an end-of-turn marker like <|im_end|> or <|eot_id|> counts); when the
    template writes none after a turn, the eos id is appended. IGNORE elsewhere. `system` is prepended as a system
    turn where a conversation has none.

    Incremental rendering: the text before assistant turn i is render(messages[:i], add_generation_prompt=True) and
    the turn is what render(messages[:i + 1]) adds to it; each segment is tokenised on its own with
    add_special_tokens=False (so the prompt ids are exactly those generation sees; BOS only if the template writes it).
    """
    eos = tokenizer.eos_token_id
    stops = set(stop_ids) if stop_ids is not None else {eos}
    if len(conversations) != len(responses):
        raise ValueError(f"{len(conversations)} conversations but {len(responses)} responses")
    plans = []   # per example: [(context text, turn text, is_last)]
    for k, (conversation, response) in enumerate(zip(conversations, responses)):
        messages = to_messages(conversation, system)
        if not messages or messages[-1]["role"] != "user":
            raise ValueError(f"conversation {k} must end with a user turn (its reply is responses[{k}]); it ends with "
                             f"{messages[-1]['role'] if messages else 'nothing'}")
        messages.append({"role": "assistant", "content": response})
        done, plan = "", []
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for i in turns:
            prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
            full = render(tokenizer, messages[:i + 1], add_generation_prompt=False)
            if not prefix.startswith(done) or not full.startswith(prefix):
                raise ValueError(
                    f"chat template problem (conversation {k}, assistant turn at message {i}): rendering the messages "
                    "one turn at a time is not prefix-consistent (the template rewrites earlier turns or its "
                    "generation prompt is not how it starts an assistant turn), so the assistant tokens cannot be "
                    f"located; prompt ends {prefix[-40:]!r}, full text there {full[len(done):][:80]!r}. Set "
                    "base.chat_template to a template without that behaviour")
            plan.append((prefix[len(done):], full[len(prefix):], i == turns[-1]))
            done = full
        plans.append(plan)
    texts = [t for plan in plans for seg in plan for t in seg[:2]]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    out = []
    for plan in plans:
        ids, labels = [], []
        for _, _, last in plan:
            context, turn = next(encoded), next(encoded)
            end = next((j for j, t in enumerate(turn) if t in stops), None)
            labelled, tail = (turn + [eos], []) if end is None else (turn[:end + 1], turn[end + 1:])
            if last:
                tail = []   # nothing to predict after the final turn's end marker (e.g. ChatML's trailing newline)
            ids += context + labelled + tail
            labels += [IGNORE] * len(context) + labelled + [IGNORE] * len(tail)
        out.append((ids, labels))
    return out
