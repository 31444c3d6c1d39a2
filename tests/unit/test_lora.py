"""LoRA through peft (issue 7 §5): only the adapters train, saved models are merged plain checkpoints that score
exactly like the adapted model, and both in-process engines sample from the adapted policy with a verified sync."""
import math
import tempfile
from pathlib import Path

import pytest
import torch

from alignflow import models
from alignflow.config import CandidateConfig, LoraSettings, RLConfig, TinyModelConfig
from alignflow.rollout import token_logprobs
from alignflow import lora
from alignflow.train.rl import train_candidate

SETTINGS = LoraSettings(r=4, alpha=8)


def tiny():
    torch.manual_seed(0)
    tok = models.build_tokenizer()
    return models.build_tiny_model(tok, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                                        intermediate_size=64)), tok


def length_reward(prompts, completions, **kw):
    return [float(len(c) % 2) for c in completions]


@pytest.mark.parametrize("engine", ["transformers", "static"])
def test_lora_rl_trains_only_adapters_and_the_engine_follows_them(engine, tmp_path):
    model, tok = tiny()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    policy = lora.wrap(model, SETTINGS)
    logs = []
    train_candidate(policy, tok, CandidateConfig(name="t", algorithm="grpo", steps=3, checkpoints=[3], lr=5e-2,
                                                 seeds=[0]), 0,
                    RLConfig(prompts_per_step=4, group_size=4, max_new_tokens=8, engine=engine),
                    ["1+2=?", "3+4=?", "12+9=?", "47+85=?"], ["3", "7", "21", "132"], tmp_path,
                    on_log=lambda s, m: logs.append(m), reward_fn=length_reward)
    # the verified sync held after every update, and the engine sampled the adapted policy (TIS ratio ~1)
    assert all(m["sync_max_abs_diff"] < 1e-4 and abs(m["tis_ratio_mean"] - 1) < 1e-3 for m in logs), logs
    trained = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    backbone = lora.backbone(policy)
    assert all(torch.equal(p, base[n.replace(".base_layer", "")]) for n, p in backbone.named_parameters()
               if "lora_" not in n)
    # the snapshot is a plain checkpoint with the adapters merged, scoring like the adapted policy
    snapshot, _ = models.load(tmp_path / "snapshots" / "t-s0-3")
    assert not lora.is_peft(snapshot)
    ids = tok(["<|user|>12+34=?<|assistant|>2+4=6;1+3=4;A:46<|end|>"], return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        adapted = token_logprobs(policy, ids, mask, ids.shape[1] - 1)
        plain = token_logprobs(snapshot, ids, mask, ids.shape[1] - 1)
        untrained = token_logprobs(model.__class__(model.config), ids, mask, ids.shape[1] - 1)
    torch.testing.assert_close(plain, adapted, rtol=0, atol=1e-5)
    assert not torch.allclose(plain, untrained)


def test_lora_sft_lowers_the_loss_and_saves_merged(tmp_path):
    from alignflow.train import supervised
    model, tok = tiny()
    policy = lora.wrap(model, SETTINGS)
    examples = models.sft_examples(tok, ["1+2=?", "3+4=?"] * 8, ["1+2=3;A:3", "3+4=7;A:7"] * 8)
    generator = torch.Generator().manual_seed(0)
    losses = []
    supervised.train_lm(policy, supervised.sft_batches(examples, 8, tok.pad_token_id, generator), generator,
                        steps=30, lr=1e-2, ckpt_dir=tmp_path / "ckpt", checkpoint_every=10,
                        on_log=lambda s, m: losses.append(m["loss"]), desc="sft")
    # embeddings and head stay frozen at random init, so the adapters can only take part of the loss away
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.3
    models.save(policy, tok, tmp_path / "sft")
    saved, _ = models.load(tmp_path / "sft")
    assert not lora.is_peft(saved) and lora.is_peft(policy)  # saving merged a copy; training keeps its adapters
    batch = supervised.sft_batches(examples, 4, tok.pad_token_id, torch.Generator().manual_seed(1))()
    with torch.no_grad():
        torch.testing.assert_close(saved(**batch).loss, policy(**batch).loss, rtol=1e-5, atol=1e-6)


def test_lora_settings_errors_name_the_key():
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="r\n.*greater than or equal to 1"):
        LoraSettings(r=0)
    with pytest.raises(ValidationError, match="target_modules"):
        LoraSettings(target_modules=[])
