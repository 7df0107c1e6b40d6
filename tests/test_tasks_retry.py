"""tasks.retry: every task retries transient failures with exponential backoff, fails at once on a permanent
error, and stops waiting to retry once its flow run has ended.

Runs real Prefect tasks and flows against the session's Prefect API; the backoff is shortened by setting
tasks.retry.BACKOFF_S (the policy under test is the retry condition and the count; the schedule is checked as
numbers)."""

from __future__ import annotations

import errno
import time

import pytest

from synth_core.config import ConfigError
from tasks import retry
from tasks.retry import BACKOFF_S, RETRIES, RETRY


def _flaky(errors: list[BaseException]):
    from prefect import flow, task

    attempts: list[int] = []

    @task(**RETRY)
    def shard() -> int:
        attempts.append(1)
        if len(attempts) <= len(errors):
            raise errors[len(attempts) - 1]
        return len(attempts)

    @flow
    def stage() -> int:
        return shard()

    return stage, attempts


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(retry, "BACKOFF_S", 0.01)


def test_transient_errors_are_retried(prefect_api, fast_backoff):
    stage, attempts = _flaky(
        [OSError("storage timeout"), ConnectionError("endpoint reset"), TimeoutError("read timed out")]
    )
    assert stage() == 4 and len(attempts) == 4


def _no_credentials() -> BaseException:
    from botocore.exceptions import NoCredentialsError

    return NoCredentialsError()


def _arrow_invalid() -> BaseException:
    import pyarrow as pa

    try:
        pa.array(["x"]).cast(pa.int64())
    except pa.ArrowInvalid as err:
        return err
    raise AssertionError("the cast should fail")


@pytest.mark.parametrize(
    "make",
    [
        lambda: ConfigError("unknown key 'pool.snipets'"),
        lambda: KeyError("content"),
        _arrow_invalid,
        lambda: OSError(errno.EROFS, "Read-only file system", "/ro/out"),
        lambda: OSError(errno.ENOSPC, "No space left on device", "/full/out"),
        lambda: FileExistsError(errno.EEXIST, "File exists", "/out"),
        lambda: PermissionError("Access Denied"),
        _no_credentials,
    ],
    ids=["config", "key", "arrow", "erofs", "enospc", "eexist", "permission", "no-credentials"],
)
def test_permanent_errors_fail_at_once(prefect_api, fast_backoff, make):
    err = make()
    stage, attempts = _flaky([err])
    with pytest.raises(type(err)):
        stage()
    assert len(attempts) == 1


def test_retries_give_up_after_the_last_attempt(prefect_api, fast_backoff):
    stage, attempts = _flaky([OSError("down")] * (RETRIES + 1))
    with pytest.raises(OSError, match="down"):
        stage()
    assert len(attempts) == RETRIES + 1


def test_backoff_doubles():
    assert retry.retry_delays() == [BACKOFF_S * 2**i for i in range(RETRIES)]
    assert 0 < retry.JITTER <= 1
    # Prefect itself must not sleep: its sleep cannot be interrupted when the flow run ends.
    assert RETRY["retry_delay_seconds"] == 0


@pytest.mark.parametrize("runner", ["threads", "processes"])
def test_waiting_shards_stop_once_the_flow_has_failed(prefect_api, monkeypatch, tmp_path, runner):
    """One shard fails permanently while another waits out its backoff: the flow (and so the CLI) ends within
    seconds, not after the backoff (threads: 30 + 60 + 120 s; processes, whose workers import the default
    BACKOFF_S: 10 + 20 + 40 s). Attempts are counted in a file: worker processes share no memory."""
    from prefect import flow, task
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    from flows.runtime import run_shards

    monkeypatch.setattr(retry, "BACKOFF_S", 30.0)
    counter = str(tmp_path / "flaky-attempts")

    @task(**RETRY)
    def flaky() -> None:
        with open(counter, "a") as f:
            f.write("1")
        raise ConnectionError("endpoint reset")

    @task(**RETRY)
    def bad() -> None:
        time.sleep(2.0)  # the flaky shard is waiting to retry by now
        raise KeyError("content")

    task_runner = ThreadPoolTaskRunner(max_workers=2) if runner == "threads" else ProcessPoolTaskRunner(max_workers=2)

    @flow(task_runner=task_runner)
    def stage() -> None:
        from prefect.artifacts import create_progress_artifact

        progress = create_progress_artifact(progress=0.0)
        run_shards([flaky.submit, bad.submit], "test", progress, 0, 2)

    t0 = time.monotonic()
    with pytest.raises(KeyError):
        stage()
    elapsed = time.monotonic() - t0
    # Generous bounds (a loaded 2-core machine spawns workers slowly); without the fix: 210 s and 70 s.
    assert elapsed < (20 if runner == "threads" else 45), f"the flow took {elapsed:.1f} s to end"
    assert open(counter).read() == "1"


def test_every_stage_shard_and_commit_is_a_retried_task_under_its_ui_name():
    from synth_core import evaluate, pool, sample, score
    from synth_core.influence import stage as influence
    from tasks import round as round_tasks
    from tasks import stage as stage_tasks

    names = {
        sample.STAGE: ("sample-shard", "sample-commit"),
        score.STAGE: ("score-shard", "score-commit"),
        pool.INGEST: ("pool-ingest-shard", "pool-commit-ingest"),
        pool.DECONTAMINATE: ("pool-decontaminate-shard", "pool-commit"),
        evaluate.STAGE: ("evaluate", "evaluate-commit"),
        influence.STAGE: ("influence-shard", "influence-commit"),
    }
    for stage, (shard_name, commit_name) in names.items():
        shard, commit = stage_tasks.shard_task(stage), stage_tasks.stage_commit_task(stage)
        assert (shard.name, commit.name) == (shard_name, commit_name)
        for t in (shard, commit, round_tasks.build_release, round_tasks.convergence_record):
            assert t.retries == RETRIES and t.retry_condition_fn is retry.is_transient, t.name
    assert "gpu" in stage_tasks.shard_task(sample.STAGE).tags and not stage_tasks.stage_commit_task(sample.STAGE).tags
    targets = stage_tasks.setup_task(influence.STAGE)  # R's features per checkpoint, before the shards
    assert targets.name == "influence-targets" and targets.retries == RETRIES and "gpu" in targets.tags
