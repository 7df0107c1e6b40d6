"""Benchmark of Prefect's orchestration overhead (issue 6): wall time of a stage as a flow vs the same work in-process.

What it measures, in ONE run, against one local Prefect server (started once, before any timing, as a
deployment has one running; its own CPU use while the flows run is part of what is measured):

a) A stage of N shards of trivial work (default 1,000 shards of about 1 ms of pure-Python arithmetic):
   - "in-process": the shard function called N times in a loop (no Prefect);
   - "flow, run_shards": a flow submitting one task per shard through flows/runtime.run_shards (the wiring of
     every sharded stage: thread runner with max_workers = the cores, a progress artifact updated after each
     shard), exactly as the stages do;
   - "flow, task.map": the same tasks through `task.map` and one wait (no progress artifact).
b) The default pool stage (stdlib sources, default config, a fresh storage root each):
   - "in-process": `synth_core.pool.build_pool` (the same steps, one after the other, no Prefect);
   - "flow, threads x1": `flows.pool.pool_flow` with the thread runner and ONE worker, i.e. the same sequential
     work as build_pool, so that the difference is Prefect's orchestration alone;
   - "flow, default": `pool_flow` with the default execution config (a process pool over the cores), the way
     `scoder pool build` runs it: wall time and speed-up, with the process start-up it costs.

For each flow row: wall time (the flow call, from start to return), the time spent inside task bodies
(measured inside them: the shards' own clocks, or the pool manifest's per-step work_s; summed over parallel
tasks, so it can exceed the wall time), wall - that ("outside"), overhead = flow wall - in-process wall, the
overhead as a share of the flow's wall time, and per task run. The goal in issue 6 is an overhead under 5% of
a round's wall time; a stage of 1,000 trivial shards is the worst case (work per shard ~1 ms vs seconds to
minutes in real stages), so the run also prints what the measured per-task overhead would be for shards of
1 s and 10 s of work. The server's CPU seconds during each flow row are measured too (/proc), and after each
flow row the run waits until the server has written the run's events (its "backlog", not in the wall time),
so that no row is billed for the previous one's. The load average at the start and the end is recorded,
since other jobs may share the cores.

    python bench/prefect_overhead.py [--shards 1000] [--work-ms 1] [--skip-pool] [--out-json PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, cpu_name, package_version, print_table, write_json

DEFAULT_OUT_JSON = RESULTS_DIR / "prefect_overhead.json"
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Before Prefect is imported (ENVIRONMENT.md): a fresh home (its SQLite database) and no analytics.
_HOME = tempfile.mkdtemp(prefix="scoder-bench-prefect-")
os.environ["PREFECT_HOME"] = _HOME
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.pop("PREFECT_API_URL", None)

from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_progress_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=1000, help="Shards of the trivial stage.")
    parser.add_argument("--work-ms", type=float, default=1.0, help="Work per trivial shard (ms of arithmetic).")
    parser.add_argument("--skip-pool", action="store_true", help="Measure only the trivial stage.")
    parser.add_argument("--out-json", type=Path, default=DEFAULT_OUT_JSON, help="Where to write the JSON results.")
    return parser.parse_args(argv)


def calibrate(work_ms: float) -> int:
    """Loop length of `spin` that takes about work_ms on this machine (best of 5)."""
    n = 10_000
    best = min(_timed(spin, n) for _ in range(5))
    return max(1, int(n * work_ms / 1000 / best))


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def shard_work(index: int, loops: int) -> float:
    """One trivial shard: `loops` iterations of arithmetic; returns the seconds it took (its own clock)."""
    return _timed(spin, loops + index % 2)


@task(name="trivial-shard", task_run_name="trivial-shard-{index}", cache_policy=NO_CACHE)
def trivial_shard(index: int, loops: int) -> float:
    return shard_work(index, loops)


@flow(name="overhead-run-shards")
def run_shards_flow(shards: int, loops: int) -> float:
    from flows.runtime import run_shards

    progress = create_progress_artifact(progress=0.0, key="overhead-progress", description="trivial")
    submits = [partial(trivial_shard.submit, i, loops) for i in range(shards)]
    return sum(run_shards(submits, "trivial", progress, 0, shards))


@flow(name="overhead-map")
def map_flow(shards: int, loops: int) -> float:
    return sum(trivial_shard.map(range(shards), loops=loops).result())


class ServerMeter:
    """CPU seconds of the Prefect server process (/proc), and a wait until it has worked off its backlog."""

    def __init__(self, pid: int):
        self.pid = pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / self.tick  # utime, stime, cutime, cstime

    def settle(self, idle_share: float = 0.1, window_s: float = 0.5, limit_s: float = 120.0) -> float:
        """Wait until the server uses under idle_share of a core; return the seconds waited.

        The flow's events and logs reach the server asynchronously: a flow can return while the server still
        writes its task runs. Each row starts only after that backlog, so it is not billed to the next row.
        """
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        t0 = time.perf_counter()
        APILogWorker.drain_all()
        EventsWorker.drain_all()
        while time.perf_counter() - t0 < limit_s:
            c = self.cpu_s()
            time.sleep(window_s)
            if self.cpu_s() - c < idle_share * window_s:
                break
        return time.perf_counter() - t0


def quiet_console() -> None:
    """Task runs still log to the API as in production; only the terminal is spared 1,000 lines."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for h in getattr(logger, "handlers", []):
            if isinstance(h, PrefectConsoleHandler):
                h.setLevel(logging.WARNING)


def flow_row(stage: str, mode: str, wall: float, in_task: float, base_wall: float, tasks: int) -> dict[str, Any]:
    overhead = wall - base_wall
    return {
        "stage": stage,
        "mode": mode,
        "wall_s": round(wall, 3),
        "in_task_s": round(in_task, 3),
        "task_runs": tasks,
        "overhead_s": round(overhead, 3),
        "overhead_pct_of_wall": round(100 * overhead / wall, 1),
        "overhead_ms_per_task": round(1000 * overhead / tasks, 2) if tasks else None,
    }


def timed_flow(meter: ServerMeter, fn, *args, **kwargs) -> tuple[Any, float, dict[str, float]]:
    """Run a flow call; return its result, its wall time, and the server's CPU seconds and backlog after it."""
    c0 = meter.cpu_s()
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    wall = time.perf_counter() - t
    backlog = meter.settle()
    return result, wall, {"server_cpu_s": round(meter.cpu_s() - c0, 2), "server_backlog_s": round(backlog, 2)}


def measure_trivial(
    shards: int, work_ms: float, workers: int, meter: ServerMeter
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from flows.runtime import make_task_runner
    from synth_core.config import RunConfig

    loops = calibrate(work_ms)
    cfg = RunConfig()
    cfg.execution.task_runner, cfg.execution.max_workers = "threads", workers
    runner = make_task_runner(cfg)
    # Warm-up (imports, the client's connections, the flow's registration): not timed.
    run_shards_flow.with_options(task_runner=runner)(4, loops)
    map_flow.with_options(task_runner=runner)(4, loops)
    meter.settle()

    t = time.perf_counter()
    in_task = sum(shard_work(i, loops) for i in range(shards))
    base = time.perf_counter() - t
    rows = [
        {
            "stage": f"{shards} trivial shards",
            "mode": "in-process loop",
            "wall_s": round(base, 3),
            "in_task_s": round(in_task, 3),
            "task_runs": 0,
        }
    ]
    for mode, fl in ((f"flow, run_shards, threads x{workers}", run_shards_flow), ("flow, task.map", map_flow)):
        in_task, wall, server = timed_flow(meter, fl.with_options(task_runner=runner), shards, loops)
        rows.append(flow_row(rows[0]["stage"], mode, wall, in_task, base, shards) | server)
    return rows, {"loops_per_shard": loops, "work_ms": work_ms}


def _pool_in_task_s(uri: str) -> tuple[float, int]:
    """Seconds inside the pool's task bodies (per-step work_s; dedup is one task) and the number of task runs."""
    from synth_core.storage import read_manifest

    steps = {s["step"]: s for s in read_manifest(uri).stats["steps"]}
    work = steps["ingest"].get("work_s", steps["ingest"]["wall_s"]) + steps["dedup"]["wall_s"]
    work += steps["decontaminate"].get("work_s", steps["decontaminate"]["wall_s"])
    tasks = steps["ingest"]["shards"] + steps["decontaminate"]["shards"] + 3  # + commit-ingest, dedup, commit
    return work, tasks


def measure_pool(tmp: Path, meter: ServerMeter) -> list[dict[str, Any]]:
    from flows.pool import pool_flow
    from flows.runtime import make_task_runner
    from synth_core.config import RunConfig
    from synth_core.pool import build_pool

    def fresh(name: str, runner: str | None = None, workers: int | None = None) -> RunConfig:
        cfg = RunConfig()
        cfg.storage.root = str(tmp / name)
        if runner:
            cfg.execution.task_runner, cfg.execution.max_workers = runner, workers
        return cfg

    cfg = fresh("in-process")
    t = time.perf_counter()
    uri = build_pool(cfg)
    base = time.perf_counter() - t
    in_task, tasks = _pool_in_task_s(uri)
    stage = "default pool (stdlib)"
    rows = [
        {
            "stage": stage,
            "mode": "in-process build_pool",
            "wall_s": round(base, 3),
            "in_task_s": round(in_task, 3),
            "task_runs": 0,
        }
    ]
    for mode, cfg in (
        ("flow, threads x1", fresh("threads1", "threads", 1)),
        (f"flow, default ({RunConfig().execution.task_runner})", fresh("default")),
    ):
        fl = pool_flow.with_options(task_runner=make_task_runner(cfg))
        out, wall, server = timed_flow(meter, fl, config=cfg.model_dump(mode="json"))
        in_task, tasks = _pool_in_task_s(out)
        rows.append(flow_row(stage, mode, wall, in_task, base, tasks) | server)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from prefect.server.api.server import SubprocessASGIServer

    workers = os.cpu_count() or 1
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    t = time.perf_counter()
    server = SubprocessASGIServer()
    server.start()
    server_start_s = time.perf_counter() - t
    os.environ["PREFECT_API_URL"] = server.api_url
    quiet_console()
    meter = ServerMeter(server.server_process.pid)
    try:
        rows, trivial = measure_trivial(args.shards, args.work_ms, workers, meter)
        if not args.skip_pool:
            with tempfile.TemporaryDirectory(prefix="scoder-bench-overhead-") as tmp:
                rows += measure_pool(Path(tmp), meter)
    finally:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all()
        EventsWorker.drain_all()
        server.stop()
    total_s = time.perf_counter() - t_start
    load_end = os.getloadavg()

    def cell(r: dict[str, Any], key: str, fmt: str) -> str:
        return "—" if r.get(key) is None else format(r[key], fmt)

    print_table(
        f"bench/prefect_overhead.py — Prefect {package_version('prefect')}, {workers} CPU cores ({cpu_name()})",
        [
            "stage",
            "mode",
            "wall s",
            "in tasks s",
            "outside s",
            "task runs",
            "overhead s",
            "overhead % of wall",
            "ms / task",
            "server CPU s",
            "server backlog s",
        ],
        [
            [
                r["stage"],
                r["mode"],
                f"{r['wall_s']:.2f}",
                f"{r['in_task_s']:.2f}",
                f"{r['wall_s'] - r['in_task_s']:.2f}",
                str(r["task_runs"]),
                cell(r, "overhead_s", ".2f"),
                cell(r, "overhead_pct_of_wall", ".1f"),
                cell(r, "overhead_ms_per_task", ".2f"),
                cell(r, "server_cpu_s", ".1f"),
                cell(r, "server_backlog_s", ".1f"),
            ]
            for r in rows
        ],
        sections={i for i, r in enumerate(rows) if i + 1 < len(rows) and rows[i + 1]["stage"] != r["stage"]},
        use_rich=True,
    )
    per_task = rows[1]["overhead_ms_per_task"]
    projection = {
        f"{w}s_shards_pct": round(100 * per_task / 1000 / (w + per_task / 1000), 3) if per_task else None
        for w in (1, 10)
    }
    print(
        f"Per task run through run_shards: {per_task:.2f} ms of orchestration; for shards of 1 s of work that is "
        f"{projection['1s_shards_pct']:.2f}% of the wall time, for 10 s {projection['10s_shards_pct']:.3f}%."
    )
    print(
        f"Prefect server start (once, not in the rows): {server_start_s:.1f} s; load average at start "
        f"{load_start[0]:.2f}, at end {load_end[0]:.2f}; total {total_s:.1f} s"
    )
    results = {
        "benchmark": "bench/prefect_overhead.py",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {"shards": args.shards, "work_ms": args.work_ms, "skip_pool": args.skip_pool},
        "environment": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpu": cpu_name(),
            "cpu_count": workers,
            "prefect": package_version("prefect"),
            "load_average_start": load_start,
            "load_average_end": load_end,
        },
        "trivial_stage": trivial,
        "rows": rows,
        "projection_overhead_pct": projection,
        "server_start_s": round(server_start_s, 2),
        "total_wall_s": round(total_s, 2),
    }
    write_json(args.out_json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
