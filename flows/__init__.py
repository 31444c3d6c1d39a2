"""Prefect flows: one per DVC stage (`flows/<stage>.py`) and `post_training`, which chains them through DVC."""
STAGES = ["curate", "base", "sft", "teacher", "rl", "logged", "ope", "evaluate"]
