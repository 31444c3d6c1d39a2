"""Prefect tasks of the model-producing stages (base, sft, rl): the core steps in alignflow/steps/train.py."""
from tasks.retry import stage_task

from alignflow.steps import train as steps
from alignflow.steps.train import clear_checkpoints  # noqa: F401  (plain: runs after the tracked block)

pretrain_base = stage_task(steps.pretrain_base)
supervised_finetune = stage_task(steps.supervised_finetune)
build_teacher = stage_task(steps.build_teacher)
train_rl_candidate = stage_task(steps.train_rl_candidate)
