"""Prefect flows: the stages (flows/stages.py, one thin flow per entry of alignflow/stage.py's table) and
`post_training`, which chains them through DVC; `retrain`; the scaled mode's stage job (stage_job.py), its dispatch (dispatch.py) and deployments (deploy.py)."""


def no_heartbeat():
    """Flow runs without Prefect's heartbeat (about a second of overhead per flow run otherwise)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
