"""tasks.retry: every task retries transient failures with exponential backoff, and fails at once on bad input.

Runs real Prefect tasks against the session's Prefect API; the delays are shortened with `with_options` (the
policy under test is the retry condition and the count; the backoff schedule is checked as numbers)."""

from __future__ import annotations

import pytest

from synth_core.config import ConfigError
from tasks.retry import BACKOFF_S, RETRIES, RETRY


def _flaky(errors: list[BaseException]):
    from prefect import flow, task

    attempts: list[int] = []

    @task(**{**RETRY, "retry_delay_seconds": 0})
    def shard() -> int:
        attempts.append(1)
        if len(attempts) <= len(errors):
            raise errors[len(attempts) - 1]
        return len(attempts)

    @flow
    def stage() -> int:
        return shard()

    return stage, attempts


def test_transient_errors_are_retried(prefect_api):
    stage, attempts = _flaky([OSError("storage timeout"), ConnectionError("endpoint reset")])
    assert stage() == 3 and len(attempts) == 3


def test_bad_input_fails_at_once(prefect_api):
    stage, attempts = _flaky([ConfigError("unknown key 'pool.snipets'")])
    with pytest.raises(ConfigError, match="snipets"):
        stage()
    assert len(attempts) == 1


def test_retries_give_up_after_the_last_attempt(prefect_api):
    stage, attempts = _flaky([OSError("down")] * (RETRIES + 1))
    with pytest.raises(OSError, match="down"):
        stage()
    assert len(attempts) == RETRIES + 1


def test_backoff_doubles():
    assert RETRY["retry_delay_seconds"](RETRIES) == [BACKOFF_S * 2**i for i in range(RETRIES)]
    assert 0 < RETRY["retry_jitter_factor"] <= 1
