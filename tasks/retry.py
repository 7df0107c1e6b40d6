"""How every task retries: only transient errors, with exponential backoff and jitter, and never after the flow
run has ended.

Transient failures (object storage, a teacher or judge endpoint, an engine process that died, a lost worker) get
RETRIES more attempts after BACKOFF_S, 2 x BACKOFF_S, 4 x BACKOFF_S seconds, each stretched by up to +-JITTER so
that the shards of a stage that failed together (a storage outage) do not retry together. A permanent failure
(synth_core.errors.is_permanent: bad input, a wrong config, a read-only or full disk, an existing file where a
folder goes, missing credentials) fails its task at once with the error visible in the Prefect UI; a re-run of
the round then redoes only what failed (stage outputs are content-addressed).

The backoff is waited inside the retry condition, not by Prefect: Prefect sleeps a retry delay in one
uninterruptible `time.sleep`, so shards waiting to retry kept the task runner (and the CLI) alive for up to
70 s after their flow run had already failed. Here the wait polls the flow run's state every POLL_S and gives
up as soon as the run is final (failed, crashed, completed) or being cancelled: the CLI exits within seconds of
a flow failing. The price: while a task waits out its backoff, the Prefect UI shows it Running (not
AwaitingRetry); its log says what it waits for and how long.
"""

from __future__ import annotations

import random
import time
from typing import Any

from synth_core.errors import describe, is_permanent

RETRIES = 3
BACKOFF_S = 10.0
JITTER = 0.5
# Seconds between two looks at the flow run's state while a shard waits to retry (one API call each).
POLL_S = 0.5


def backoff_s(attempt: int) -> float:
    """Delay before retry `attempt` (1-based), without jitter: BACKOFF_S doubled per earlier retry."""
    return BACKOFF_S * 2 ** max(attempt - 1, 0)


def retry_delays() -> list[float]:
    """The delays before each of the RETRIES retries (seconds, without jitter)."""
    return [backoff_s(i + 1) for i in range(RETRIES)]


def _flow_run_ended(client: Any, flow_run_id: Any) -> bool:
    """True when the flow run is final or being cancelled; an API hiccup is not taken for an ended run."""
    try:
        state = client.read_flow_run(flow_run_id).state
    except Exception:  # the API being briefly unreachable must not turn a transient failure into a lost shard
        return False
    return state is not None and (state.is_final() or state.is_cancelling() or state.is_paused())


def wait_unless_flow_ended(flow_run_id: Any, delay_s: float) -> bool:
    """Wait `delay_s` seconds; return False at once if the flow run ends meanwhile (True: go ahead and retry)."""
    if flow_run_id is None:
        time.sleep(delay_s)
        return True
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + delay_s
    with get_client(sync_client=True) as client:
        while True:
            if _flow_run_ended(client, flow_run_id):
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(POLL_S, left))


def _log(message: str) -> None:
    try:
        from prefect import get_run_logger

        get_run_logger().warning(message)
    except Exception:  # no run context (a task called outside a flow): the message is not worth a crash
        pass


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: False for a permanent error; else wait the backoff and retry, unless the
    flow run ended during the wait."""
    exc = state.data
    if isinstance(exc, BaseException) and is_permanent(exc):
        _log(f"not retried (permanent): {describe(exc)}")
        return False
    attempt = max(int(getattr(task_run, "run_count", 1) or 1), 1)
    delay = backoff_s(attempt) * (1 + random.uniform(-JITTER, JITTER))
    what = describe(exc) if isinstance(exc, BaseException) else repr(exc)
    _log(f"transient error, retry in {delay:.1f} s unless the flow run ends first: {what}")
    if not wait_unless_flow_ended(getattr(task_run, "flow_run_id", None), delay):
        _log("not retried: the flow run has ended")
        return False
    return True


# Keyword arguments of @task for every task of the project. Prefect's own delay is 0: is_transient waits.
RETRY: dict[str, Any] = dict(
    retries=RETRIES,
    retry_delay_seconds=0,
    retry_condition_fn=is_transient,
)
