"""The stage bodies named by the stage table (alignflow/stage.py STAGES) and the steps they call through
`ctx.task` (Prefect tasks under a flow, plain calls otherwise); `python -m alignflow.steps` runs any stage on a
machine with only PyTorch and transformers (a GPU box)."""
