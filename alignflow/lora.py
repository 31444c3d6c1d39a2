"""LoRA through peft for the SFT and RL stages (`sft.lora`, `rl.lora` in pipelines.yaml).

Only the adapters train; every model that leaves a stage (outputs, RL snapshots, the weights a rollout engine in
its own process loads) is the merged model, a plain transformers checkpoint, so later stages, vLLM and `evaluate`
never see peft. An in-process engine that samples from the trainer's object (transformers) runs the adapters
directly; one that reads the weights itself (static) gets the merged weights on every sync, and the sync is
verified on the probe like full weights (alignflow/rollout)."""
from __future__ import annotations

import copy

from alignflow.config import LoraSettings


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def wrap(model, settings: LoraSettings):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                            target_modules=list(settings.target_modules), task_type="CAUSAL_LM"))


def merged(model):
    """A plain transformers model with the adapters merged in (a copy; the trained model keeps its adapters)."""
    return copy.deepcopy(model).merge_and_unload() if is_peft(model) else model


def backbone(model):
    """The causal LM under a peft wrapper (its layers carry the adapters), or the model itself."""
    return model.get_base_model() if is_peft(model) else model
