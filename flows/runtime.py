"""How flows run on this machine: the task runner the config asks for, and a Prefect API to report to.

Shared by every flow's CLI entry. Flows themselves stay wiring only.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from synth_core.config import ConfigError, RunConfig
from synth_core.storage import ShardResult

# Seconds between two updates of a stage's progress artifact (an API call each).
PROGRESS_INTERVAL_S = 1.0
# Seconds a Ctrl-C'd run gets to unwind in order before it exits hard (the reaper then ends its processes).
INTERRUPT_GRACE_S = 5.0


def make_task_runner(cfg: RunConfig):
    """The task runner the execution config asks for."""
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    ex = cfg.execution
    if ex.task_runner == "ray":
        try:
            from flows.ray_runner import make_ray_task_runner
        except ImportError as err:
            raise ConfigError(
                f"execution.task_runner is 'ray' but prefect-ray/ray are not installed ({err}): pip install '.[ray]'"
            ) from err
        return make_ray_task_runner(
            ex.ray_address, ex.max_workers, ex.ray_cpus_per_shard, ex.ray_gpus_per_shard, ex.ray_runtime_env
        )
    workers = cfg.execution.max_workers or os.cpu_count() or 1
    if cfg.execution.task_runner == "processes":
        return ProcessPoolTaskRunner(max_workers=workers)
    return ThreadPoolTaskRunner(max_workers=workers)


def prefect_env() -> None:
    """Quiet, local-friendly Prefect defaults, set before Prefect is imported (ENVIRONMENT.md)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "synth_core")


def run_flow(flow_fn, cfg: RunConfig, **params):
    """Run a flow with the configured task runner, against PREFECT_API_URL or one local temporary server.

    Without PREFECT_API_URL, every worker process of a ProcessPoolTaskRunner would start its own
    temporary Prefect server (seconds of CPU each, measured); one shared server, whose URL the
    workers inherit through the environment, avoids that.
    """
    from flows.reaper import Reaper

    # The reaper ends the server and workers and crashes the flow run if this process dies without cleaning up.
    with output_guard(params.get("out"), cfg, getattr(flow_fn, "name", "scoder")), Reaper() as reaper:
        with interrupt_deadline():
            return _run_flow_watched(flow_fn, cfg, reaper, **params)


@contextlib.contextmanager
def output_guard(out: str | None, cfg: RunConfig, owner: str) -> Iterator[None]:
    """What every writing command does before any work: check that its output location (`out`, else the work
    root) is writable, then hold its writer lock until the command ends. run_flow uses it; so do the commands
    that write without a flow (reference build, train).

    Without --out the lock covers the whole work root, whose fingerprinted outputs two identical runs would share.
    """
    from synth_core.storage import WriterLock, check_writable

    location = out or cfg.storage.root
    # An unwritable --out fails now in one line, not after ingest (and before a server starts).
    check_writable(location, cfg.storage)
    with WriterLock(location, cfg.storage, owner=owner):
        yield


def _run_flow_watched(flow_fn, cfg: RunConfig, reaper, **params):
    prefect_env()
    from prefect import tags

    runner = make_task_runner(cfg)
    if os.environ.get("PREFECT_API_URL"):
        _watch_api(reaper, os.environ["PREFECT_API_URL"])
        with tags(*reaper.tags):
            return flow_fn.with_options(task_runner=runner)(**params)
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    _watch_api(reaper, server.api_url)
    try:
        with tags(*reaper.tags):
            return flow_fn.with_options(task_runner=runner)(**params)
    finally:
        # Send buffered logs and events while the server still listens, else they retry for a minute.
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all()
        EventsWorker.drain_all()
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def _watch_api(reaper, api_url: str) -> None:
    """Tell the reaper which API to report a crash to, and crash what earlier dead runs left RUNNING there."""
    import logging

    from flows.reaper import crash_orphaned

    reaper.tell_api(api_url)
    try:
        crashed = crash_orphaned(api_url)
    except Exception as err:  # an API that rejects the filter must not stop the run; the flow call will tell
        logging.getLogger(__name__).warning("could not look for orphaned flow runs at %s: %s", api_url, err)
        return
    if crashed:
        logging.getLogger(__name__).warning("marked %d flow run(s) of dead scoder processes as Crashed", crashed)


@contextlib.contextmanager
def interrupt_deadline(grace_s: float = INTERRUPT_GRACE_S) -> Iterator[None]:
    """Ctrl-C (SIGINT) ends the process within `grace_s`: the first interrupt unwinds as usual (Prefect marks the
    flow run crashed); if unwinding is still stuck after `grace_s` (the task runner's shutdown waits for every
    running shard: over 15 s seen), the process exits hard and the reaper ends what is left."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum: int, frame: Any) -> None:
        timer = threading.Timer(grace_s, os._exit, args=(128 + signum,))
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_shards(
    submits: list[Callable[[], Any]],
    label: str,
    progress_id: Any,
    done_before: int,
    total: int,
    window: int | None = None,
) -> list[ShardResult]:
    """Submit shard tasks (each `submits[i]()` returns a future), at most `window` in flight, and wait for
    them in completion order, updating the flow's progress artifact. Results come back in shard order.

    The window keeps engine-heavy stages (one vLLM engine per shard task) from starting more engines
    than the machine holds; CPU-bound stages submit everything at once (window None).

    The progress artifact is updated at most every PROGRESS_INTERVAL_S and after the last shard: one API call per
    shard cost 8 ms a shard (bench/prefect_overhead.py: 27.7 vs 19.6 ms per task run with 1,000 shards).
    """
    from prefect.artifacts import update_progress_artifact
    from prefect.futures import as_completed

    results: list[ShardResult | None] = [None] * len(submits)
    limit = window or len(submits) or 1
    pending: dict[Any, int] = {}
    next_i = done = 0
    last_update = time.monotonic()
    while next_i < len(submits) or pending:
        while next_i < len(submits) and len(pending) < limit:
            pending[submits[next_i]()] = next_i
            next_i += 1
        f = next(as_completed(list(pending)))
        results[pending.pop(f)] = f.result()
        done += 1
        if done < len(submits) and time.monotonic() - last_update < PROGRESS_INTERVAL_S:
            continue
        last_update = time.monotonic()
        update_progress_artifact(
            progress_id,
            progress=100.0 * (done_before + done) / total,
            description=f"{label}: {done_before + done}/{total} shards",
        )
    return [r for r in results if r is not None]
