"""Prefect task retries for transient failures only (I/O hiccups, a server briefly away), with back-off.
Imports nothing heavy: the scaled mode's dispatcher uses it too."""
from __future__ import annotations

import errno

from prefect import task
from prefect.tasks import exponential_backoff

TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                    errno.ECONNABORTED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ESTALE}
# HTTP clients' transient errors, by name (requests, httpx, urllib3) so this module imports none of them
TRANSIENT_NAMES = {"ConnectionError", "ConnectTimeout", "ReadTimeout", "ConnectError", "RemoteProtocolError",
                   "ProtocolError", "NewConnectionError", "MaxRetryError"}


def is_transient(exc: BaseException) -> bool:
    """An I/O or service hiccup that a later attempt may not meet (a dropped connection, a timeout, a busy file,
    a 5xx or 429 from a tracking server). A deterministic error (bad config, a NaN abort, a bug) is not."""
    if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in TRANSIENT_NAMES:
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    status = getattr(exc, "get_http_status_code", lambda: None)()  # MlflowException / RestException
    return isinstance(status, int) and (status >= 500 or status == 429)


def _retry_if_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001  (the task's own failure, classified)
        return is_transient(exc)
    return False


def stage_task(fn=None, **options):
    """A Prefect task that Prefect retries, with exponential back-off, when it failed on a transient error
    (`is_transient`), and never on a deterministic one. Training tasks resume from their checkpoint."""
    options = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=2), "retry_jitter_factor": 0.5,
               "retry_condition_fn": _retry_if_transient, **options}
    return task(fn, **options) if fn is not None else task(**options)


