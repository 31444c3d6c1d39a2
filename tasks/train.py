"""Prefect tasks of the model-producing stages (base, sft, rl): the core steps in alignflow/steps/train.py."""
from prefect import task

from alignflow.steps import train as steps
from alignflow.steps.train import clear_checkpoints  # noqa: F401  (plain: runs after the tracked block)

pretrain_base = task(steps.pretrain_base)
supervised_finetune = task(steps.supervised_finetune)
build_teacher = task(steps.build_teacher)
train_rl_candidate = task(steps.train_rl_candidate)
