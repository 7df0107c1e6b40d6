"""How every task retries: exponential backoff with jitter, and never for errors that a retry cannot mend.

Transient failures (object storage, a teacher or judge endpoint, an engine process that died, a lost worker) get
RETRIES more attempts after BACKOFF_S, 2 x BACKOFF_S, 4 x BACKOFF_S seconds (Prefect's `exponential_backoff`),
each stretched by up to +-JITTER so that the shards of a stage that failed together (a storage outage) do not
retry together. A deterministic failure (bad input, a wrong config: synth_core raises ValueErrors for those, e.g.
ConfigError, SourceError, ReferenceSetError, ScoreError) fails its task at once with the error visible in the
Prefect UI; a re-run of the round then redoes only what failed (stage outputs are content-addressed).
"""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

RETRIES = 3
BACKOFF_S = 10.0
JITTER = 0.5


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: retry unless the task failed on bad input (a ValueError)."""
    return not isinstance(state.data, ValueError)


# Keyword arguments of @task for every task of the project.
RETRY: dict[str, Any] = dict(
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=BACKOFF_S),
    retry_jitter_factor=JITTER,
    retry_condition_fn=is_transient,
)
