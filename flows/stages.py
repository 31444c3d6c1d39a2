"""The stages as Prefect flows: one thin flow per entry of the stage table (alignflow/stage.py STAGES), each
running its stage through `run_stage` with its steps as Prefect tasks (retried on transient errors) and its
summary as UI artifacts. `alignflow stage NAME` (dvc.yaml's cmd) calls these; `post_training` chains them
through DVC.

    dvc repro rl@tiny     or     alignflow stage rl --pipeline tiny
"""
from __future__ import annotations

from prefect import flow

from alignflow.stage import STAGES, run_stage
from tasks.common import as_task, publish_summary


def _stage_flow(name: str):
    @flow(name=name, flow_run_name=f"{name}-{{pipeline}}", log_prints=True)
    def stage_flow(pipeline: str = "tiny") -> dict:
        return run_stage(name, pipeline, task=as_task, publish=publish_summary)
    stage_flow.__doc__ = f"The {name} stage ({STAGES[name].run})."
    return stage_flow


FLOWS = {name: _stage_flow(name) for name in STAGES}
