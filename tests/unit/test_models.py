"""Models as users have them (issue 15, item 4): local checkpoints built here in tmp_path (never downloaded) -
a Qwen2 ChatML model with tied embeddings, a Llama-class model whose tokenizer adds BOS, a GPT-2 class model with
no pad token and no chat template - loaded, saved, rendered, tokenised for SFT, generated from, and pre-flighted."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from alignflow import checkpoint, models
from alignflow.config import TinyModelConfig
from alignflow.rollout.engine import Sampling, TransformersEngine
from alignflow.train import supervised

REPO = Path(__file__).resolve().parents[2]
TEXTS = [f"reverse the word {w}: {w[::-1]}" for w in
         ["apple", "banana", "cherry", "dog", "elephant", "forest", "garden", "house", "island", "jungle"]] * 5
SMALL = dict(vocab_size=400, hidden_size=64, layers=2, heads=2, kv_heads=1, intermediate=128)


def _make_model_module():
    spec = importlib.util.spec_from_file_location("make_model", REPO / "examples/reverse/make_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return _make_model_module().make_model(tmp_path_factory.mktemp("qwen") / "model", TEXTS, **SMALL)


def _bpe(special: list[str], bos: str | None = None):
    from tokenizers import Tokenizer, decoders, models as tm, pre_tokenizers, processors, trainers
    tok = Tokenizer(tm.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos is not None:   # Llama-style: the tokenizer itself puts BOS in front of every encoding
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    return tok


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    out = tmp_path_factory.mktemp("llama") / "model"
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(["<s>", "</s>", "<pad>"], bos="<s>"), bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>", add_bos_token=True)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                         "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    out = tmp_path_factory.mktemp("gpt2") / "model"
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(["<|endoftext|>"]), eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>")
    assert tok.pad_token is None and not tok.chat_template
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=128,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _copy(src: Path, dst: Path, drop=("*.safetensors",)) -> Path:
    shutil.copytree(src, dst)
    for pattern in drop:
        for f in dst.glob(pattern):
            f.unlink()
    return dst


# ---------------------------------------------------------------------------------------------- (a) Qwen2 ChatML, tied
def test_qwen_chatml_tied_loads_renders_and_check_model_summarises(qwen_dir):
    model, tok = models.load(qwen_dir)
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert models.eos_ids(model, tok) == [im_end, endoftext]
    assert models.template_source(tok) == "tokenizer" and not models.pad_fallback_used(tok)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse dog"}]
    assert models.chat_prompt(tok, messages) == ("<|im_start|>system\nbe brief<|im_end|>\n"
                                                 "<|im_start|>user\nreverse dog<|im_end|>\n<|im_start|>assistant\n")
    assert models.chat_prompt(tok, "hi", system="be brief").startswith("<|im_start|>system\nbe brief")
    summary = models.check_model(qwen_dir, sample=messages)
    assert summary["architecture"] == "Qwen2ForCausalLM" and summary["tied_embeddings"]
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())   # tied counted once
    assert summary["eos_ids"] == [im_end, endoftext] and summary["template_source"] == "tokenizer"
    assert summary["sample_prompt"] == models.chat_prompt(tok, messages)
    assert summary["model_vocab_size"] == summary["tokenizer_vocab_size"] == len(tok)


def test_tied_model_saves_reloads_with_equal_logits_and_stays_tied(qwen_dir, tmp_path):
    model, tok = models.load(qwen_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.01)   # a change save must carry (to both ends of the tie)
    models.save(model, tok, tmp_path / "saved")
    again, _ = models.load(tmp_path / "saved")
    assert again.lm_head.weight is again.model.embed_tokens.weight
    ids = torch.tensor([tok("reverse the word apple", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_training_checkpoint_of_a_tied_model_saves_and_resumes(qwen_dir, tmp_path):
    """SFT's first checkpoint used to die with safetensors' "tensors share memory" on tied embeddings."""
    model, tok = models.load(qwen_dir)
    examples = models.sft_examples(tok, ["reverse dog", "reverse apple"], ["god", "elppa"],
                                       stop_ids=models.eos_ids(model, tok))
    gen = torch.Generator().manual_seed(0)
    supervised.train_lm(model, supervised.sft_batches(examples, 2, tok.pad_token_id, gen), gen, steps=2, lr=1e-3,
                        ckpt_dir=tmp_path / "ckpt", checkpoint_every=1, on_log=lambda s, m: None)
    fresh, _ = models.load(qwen_dir)
    optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = checkpoint.load_latest(tmp_path / "ckpt", fresh, optimizer)
    assert state["step"] == 2 and fresh.lm_head.weight is fresh.model.embed_tokens.weight
    torch.testing.assert_close(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight, rtol=0, atol=0)


def test_sft_examples_label_every_assistant_turn_with_its_end_marker(qwen_dir):
    model, tok = models.load(qwen_dir)
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse dog"},
                    {"role": "assistant", "content": "god"}, {"role": "user", "content": "reverse apple"}]
    (ids, labels), = models.sft_examples(tok, [conversation], ["elppa"], stop_ids=models.eos_ids(model, tok))
    assert len(ids) == len(labels)
    full = tok.apply_chat_template(conversation + [{"role": "assistant", "content": "elppa"}], tokenize=False)
    assert tok.decode(ids) == full.removesuffix("\n")    # the final turn's trailing newline is not trained on
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != models.IGNORE]) == "god<|im_end|>elppa<|im_end|>"
    assert ids[-1] == labels[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    # the prompt part is exactly what generation sees
    prompt_ids = models.encode_prompts(tok, [models.chat_prompt(tok, conversation)])["input_ids"][0].tolist()
    assert ids[:len(prompt_ids)] == prompt_ids


def test_sft_examples_reject_a_template_that_is_not_prefix_consistent(qwen_dir):
    _, tok = models.load(qwen_dir, chat_template=(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>bot\n{% endif %}"))
    with pytest.raises(ValueError, match="chat template problem"):
        models.sft_examples(tok, ["reverse dog"], ["god"])
    with pytest.raises(ValueError, match="must end with a user turn"):
        models.sft_examples(tok, [[{"role": "assistant", "content": "x"}]], ["y"])


def test_tiny_default_sft_examples_unchanged():
    """The embedded tiny tokenizer: prompt ids + response ids + eos, labels on response + eos (the old formula)."""
    tok = models.build_tokenizer()
    prompts, responses = ["1+2=?", "12+34=?"], ["1+2=3;A:3", "2+4=6;1+3=4;A:46"]
    old_p = tok([models.chat_prompt(tok, p) for p in prompts], add_special_tokens=False)["input_ids"]
    old_r = tok([r + tok.eos_token for r in responses], add_special_tokens=False)["input_ids"]
    expected = [(p + r, [models.IGNORE] * len(p) + r) for p, r in zip(old_p, old_r)]
    assert models.sft_examples(tok, prompts, responses) == expected
    model = models.build_tiny_model(tok, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                                         intermediate_size=64))
    assert models.sft_examples(tok, prompts, responses, stop_ids=models.eos_ids(model, tok)) == expected
    assert models.eos_ids(model, tok) == [tok.eos_token_id]


# ---------------------------------------------------------------------------------------------- (b) BOS-adding Llama
def test_bos_adding_tokenizer_gets_exactly_one_bos(llama_dir):
    model, tok = models.load(llama_dir)
    bos = tok.bos_token_id
    assert tok("reverse dog")["input_ids"][0] == bos            # the tokenizer does add BOS by default...
    prompt = models.chat_prompt(tok, "reverse dog")
    assert prompt.startswith("<s>")                             # ...and the template writes it
    enc = models.encode_prompts(tok, [prompt, models.chat_prompt(tok, "a much longer prompt to reverse")])
    for row, mask in zip(enc["input_ids"], enc["attention_mask"]):
        real = row[mask.bool()].tolist()
        assert real.count(bos) == 1 and real[0] == bos
    assert enc["attention_mask"][0, 0] == 0                      # left padding
    (ids, labels), = models.sft_examples(tok, ["reverse dog"], ["god"], stop_ids=models.eos_ids(model, tok))
    assert ids.count(bos) == 1 and ids[0] == bos
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != -100]) == "god</s>"
    out = TransformersEngine(model, tok).generate([prompt, "[user] longer text\n[assistant] "], 1,
                                                  Sampling(max_new_tokens=3))
    P = out.input_ids.shape[1] - out.completion_mask.shape[1]
    for row, mask in zip(out.input_ids[:, :P], out.attention_mask[:, :P]):
        assert row[mask.bool()].tolist().count(bos) == (1 if row[mask.bool()][0] == bos else 0)


# --------------------------------------------------------------------------------- (c) GPT-2, no pad, no template
def test_gpt2_without_pad_or_template_loads_trains_and_generates(gpt2_dir, tmp_path):
    model, tok = models.load(gpt2_dir)
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos and models.pad_fallback_used(tok)
    assert model.config.pad_token_id == eos and model.generation_config.pad_token_id == eos
    assert models.template_source(tok) == "fallback" and tok.chat_template == models.PLAIN_CHAT_TEMPLATE
    prompt = models.chat_prompt(tok, [{"role": "system", "content": "Reverse words."},
                                      {"role": "user", "content": "dog"}])
    assert prompt == "Reverse words.\n\nUser: dog\nAssistant:"
    (ids, labels), = models.sft_examples(tok, ["dog"], [" god"])
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != -100]) == "  god<|endoftext|>"
    assert ids[-1] == eos
    out = TransformersEngine(model, tok).generate([prompt, models.chat_prompt(tok, "apple")], 2,
                                                  Sampling(max_new_tokens=4))
    assert out.input_ids.shape[0] == 4 and len(out.texts) == 4
    summary = models.check_model(gpt2_dir)
    assert summary["pad_fallback"] and summary["template_source"] == "fallback"
    assert summary["architecture"] == "GPT2LMHeadModel" and summary["eos_ids"] == [eos]
    # the fallback template is saved with the model: later stages render the same prompts
    models.save(model, tok, tmp_path / "saved")
    _, again = models.load(tmp_path / "saved")
    assert models.chat_prompt(again, "dog") == models.chat_prompt(tok, "dog")


def test_chat_template_override_string_and_jinja_file(gpt2_dir, tmp_path):
    template = "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    _, tok = models.load(gpt2_dir, chat_template=template)
    assert models.template_source(tok) == "override" and models.chat_prompt(tok, "dog") == "Q: dog\nA:"
    (tmp_path / "t.jinja").write_text(template)
    _, tok = models.load(gpt2_dir, chat_template=str(tmp_path / "t.jinja"))
    assert models.template_source(tok) == f"file:{tmp_path / 't.jinja'}"
    assert models.chat_prompt(tok, "dog") == "Q: dog\nA:"
    with pytest.raises(models.ModelError, match="does not exist"):
        models.load(gpt2_dir, chat_template=str(tmp_path / "missing.jinja"))


# ---------------------------------------------------------------------------------------------- (d) check_model errors
def _problem(path, **kw) -> str:
    with pytest.raises(models.ModelError) as err:
        models.check_model(path, **kw)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    return message


def test_check_model_names_each_problem(qwen_dir, tmp_path):
    assert "no such directory" in _problem(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _problem(tmp_path / "empty")
    no_weights = _copy(qwen_dir, tmp_path / "no-weights")
    assert "no weights" in _problem(no_weights)
    with pytest.raises(models.ModelError, match="no weights"):
        models.load(no_weights)

    pickled = _copy(qwen_dir, tmp_path / "pickled")
    model, _ = models.load(qwen_dir)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    assert "set base.allow_pickle: true to load pickle weights, which can run code" in _problem(pickled)
    with pytest.raises(models.ModelError, match="allow_pickle"):
        models.load(pickled)
    assert models.check_model(pickled, allow_pickle=True)["weights"] == "bin"
    from_pickle, tok = models.load(pickled, allow_pickle=True)
    ids = torch.tensor([tok("reverse dog", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(from_pickle(ids).logits, model(ids).logits, rtol=0, atol=0)

    big_vocab = _copy(qwen_dir, tmp_path / "big-vocab", drop=())
    cfg = json.loads((big_vocab / "config.json").read_text())
    cfg["vocab_size"] -= 10
    (big_vocab / "config.json").write_text(json.dumps(cfg))
    assert "tokenizer has" in _problem(big_vocab) and "embeddings" in _problem(big_vocab)

    not_causal = _copy(qwen_dir, tmp_path / "vit", drop=())
    from transformers import ViTConfig
    ViTConfig().save_pretrained(not_causal)
    message = _problem(not_causal)
    assert "'vit'" in message and "not a causal language model" in message
    unknown = _copy(qwen_dir, tmp_path / "unknown", drop=())
    (unknown / "config.json").write_text(json.dumps({"model_type": "no_such_lm", "architectures": ["NoSuchLM"]}))
    message = _problem(unknown)
    assert "no_such_lm" in message and "NoSuchLM" in message

    assert "chat template (override) fails" in _problem(qwen_dir, chat_template="{{ raise_exception('bad') }}")
    broken_tokenizer = _copy(qwen_dir, tmp_path / "broken-tok", drop=("tokenizer.json",))
    (broken_tokenizer / "tokenizer.json").write_text("{not json")
    assert "tokenizer failed to load" in _problem(broken_tokenizer)


# ---------------------------------------------------------------------------------------------- (e) every eos id stops
def test_after_stop_masks_after_the_first_of_any_stop_id():
    completion = torch.tensor([[5, 7, 2, 9, 0], [5, 0, 2, 9, 9], [5, 6, 7, 8, 9]])
    after = models.after_stop(completion, [2, 0])
    assert after.tolist() == [[False, False, False, True, True], [False, False, True, True, True], [False] * 5]
    assert not models.after_stop(completion, []).any()


@pytest.mark.parametrize("engine", ["transformers", "static"])
def test_generate_stops_on_the_generation_configs_second_eos(qwen_dir, engine):
    from alignflow.rollout.engine import make_engine
    model, tok = models.load(qwen_dir)
    second = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id != second and models.eos_ids(model, tok)[1] == second
    with torch.no_grad():   # all logits equal: greedy picks id 0, which is <|endoftext|>, generation_config's 2nd eos
        model.model.norm.weight.zero_()
    assert second == 0
    out = make_engine(engine, model, tok).generate([models.chat_prompt(tok, "dog")] * 2, 1,
                                                   Sampling(max_new_tokens=6, greedy=True))
    assert out.completion_mask.sum(-1).tolist() == [1, 1]
    assert out.completion_ids[:, 0].tolist() == [second, second] and out.texts == ["", ""]


def test_tokenizers_load_exactly_as_saved(qwen_dir, tmp_path):
    """transformers 5's AutoTokenizer would rebuild a generic tokenizer as config.json's model class (Qwen2Tokenizer):
    other pre-tokenizer (the tiny tokenizer lost its spaces) and an extra unk token past the embeddings."""
    from tokenizers import Tokenizer
    tok = models.build_tokenizer()
    model = models.build_tiny_model(tok, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                                         intermediate_size=64))
    models.save(model, tok, tmp_path / "tiny")
    _, again = models.load(tmp_path / "tiny")
    text = "<|user|>xyz abc 7 ; A:-3<|assistant|>"
    assert len(again) == len(tok) == model.config.vocab_size
    assert again(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert again.decode(again(text)["input_ids"]) == text
    _, qwen_tok = models.load(qwen_dir)
    raw = Tokenizer.from_file(str(qwen_dir / "tokenizer.json"))
    text = "reverse the word  jungle: elgnuj\n<|im_end|>"
    assert qwen_tok(text, add_special_tokens=False)["input_ids"] == raw.encode(text, add_special_tokens=False).ids
    assert qwen_tok.decode(qwen_tok(text)["input_ids"]) == text
