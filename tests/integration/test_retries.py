"""Transient failures are retried by Prefect with back-off; deterministic ones fail at once (issue 6, item 9)."""
import errno

import pytest

from tasks.retry import is_transient, stage_task


class FakeMlflowError(Exception):
    def __init__(self, status):
        self.status = status

    def get_http_status_code(self):
        return self.status


@pytest.mark.parametrize("exc, transient", [
    (ConnectionResetError("peer reset"), True),
    (TimeoutError("read timed out"), True),
    (OSError(errno.EIO, "I/O error"), True),
    (OSError(errno.EBUSY, "resource busy"), True),
    (type("ConnectTimeout", (Exception,), {})("httpx"), True),
    (FakeMlflowError(503), True),
    (FakeMlflowError(429), True),
    (FakeMlflowError(400), False),
    (OSError(errno.ENOENT, "no such file"), False),
    (ValueError("rl.lr must be > 0"), False),
    (RuntimeError("5 non-finite losses in a row"), False),
])
def test_transient_errors_are_told_from_deterministic_ones(exc, transient):
    assert is_transient(exc) is transient


def test_prefect_retries_the_transient_failure_and_not_the_deterministic_one(tmp_path, monkeypatch):
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness
    calls = {"flaky": 0, "broken": 0}

    @stage_task(retry_delay_seconds=0)
    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise ConnectionResetError("tracking server went away")
        return "ok"

    @stage_task(retry_delay_seconds=0)
    def broken() -> None:
        calls["broken"] += 1
        raise ValueError("a bad value, the same every time")

    @flow
    def pipeline() -> str:
        result = flaky()
        with pytest.raises(ValueError):
            broken()
        return result

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    with prefect_test_harness(server_startup_timeout=120):
        assert pipeline() == "ok"
    assert calls == {"flaky": 3, "broken": 1}
