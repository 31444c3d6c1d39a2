"""The stages' steps as plain functions over a StageContext: what tasks/ wraps as Prefect tasks, and what
`python -m alignflow.steps` runs on a machine with only PyTorch and transformers (a GPU box)."""
