"""Benchmark of the execution sandbox (issue 7): sandboxed executions per second vs plain subprocess runs.

What it measures, in ONE run, on the same programs: N small passing programs (a function and two asserts,
each program different) run

- "baseline": `subprocess.run([python, "-c", code], capture_output=True)`, no protection at all (the same
  interpreter, with its site-packages, as the sandbox's program gets);
- "sandbox": `synth_core.sandbox.run_program(code, cfg)` with the default SandboxConfig (every protection
  this machine gives: the table's footer lists them and those that are not active),

each with 1, 2 and 4 workers (threads, each running one program at a time: `run_programs` is exactly that
thread pool over `run_program`; here each call is timed too). Reported per row: executions/s (programs /
wall time of the whole batch), the ratio to the baseline at the same worker count, and the p50/p95 latency
of one program (start of the call to its result). Every program must pass in every row: the benchmark
fails otherwise. Rows run in the order given, one warm-up program first; the machine's load average at the
start and the end is recorded, since other jobs may share its cores.

Where the time goes, per program, is measured too: the bare interpreter start-up of the program
(`python -I -c pass`, with site-packages) and of the launcher (`python -I -S -c pass`), which bound what
the sandbox can reach (the sandbox starts both, one after the other).

Results are printed as a table and written as JSON (default bench/results/sandbox.json).

    python bench/sandbox.py [--programs 200] [--workers 1 2 4] [--out-json bench/results/sandbox.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, cpu_name, print_table, write_json

DEFAULT_OUT_JSON = RESULTS_DIR / "sandbox.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--programs", type=int, default=200, help="Programs run in each row.")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="Worker counts to run.")
    parser.add_argument("--out-json", type=Path, default=DEFAULT_OUT_JSON, help="Where to write the JSON results.")
    return parser.parse_args(argv)


def make_programs(n: int) -> list[str]:
    """N different small passing programs: what a solution followed by its own asserts looks like."""
    return [
        f"def scale(values, k={i}):\n"
        f"    return [v * k for v in values]\n\n"
        f"assert scale([1, 2, 3]) == [{i}, {2 * i}, {3 * i}]\n"
        f"assert sum(scale(range(10))) == {45 * i}\n"
        for i in range(n)
    ]


def run_baseline(code: str) -> bool:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=False)
    return proc.returncode == 0


def startup_ms(argv: list[str], repeats: int = 20) -> float:
    """Median wall time of one start of `argv` (ms)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def run_row(name: str, fn: Callable[[str], bool], codes: list[str], workers: int) -> dict[str, Any]:
    def timed(code: str) -> tuple[bool, float]:
        t0 = time.perf_counter()
        ok = fn(code)
        return ok, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(timed, codes))
    wall = time.perf_counter() - t0
    latencies = sorted(lat for _, lat in results)
    return {
        "mode": name,
        "workers": workers,
        "programs": len(codes),
        "passed": sum(ok for ok, _ in results),
        "seconds": wall,
        "executions_per_s": len(codes) / wall,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from synth_core.config import SandboxConfig
    from synth_core.sandbox import probe_sandbox, run_program

    cfg = SandboxConfig()
    codes = make_programs(args.programs)
    probe = probe_sandbox(cfg)
    if probe.status != "passed":
        print(f"the sandbox cannot run a program here: {probe}", file=sys.stderr)
        return 1
    load_start = os.getloadavg()
    t_start = time.perf_counter()

    def sandboxed(code: str) -> bool:
        return run_program(code, cfg).passed

    run_baseline(codes[0])
    sandboxed(codes[0])
    rows = []
    for workers in args.workers:
        base = run_row("baseline: subprocess.run", run_baseline, codes, workers)
        box = run_row("sandbox: run_program", sandboxed, codes, workers)
        box["ratio_vs_baseline"] = box["executions_per_s"] / base["executions_per_s"]
        base["ratio_vs_baseline"] = 1.0
        rows += [base, box]
    startup = {
        "program_python_I_ms": startup_ms([sys.executable, "-I", "-c", "pass"]),
        "launcher_python_I_S_ms": startup_ms([sys.executable, "-I", "-S", "-c", "pass"]),
    }
    total_s = time.perf_counter() - t_start
    load_end = os.getloadavg()

    print_table(
        f"bench/sandbox.py — {args.programs} small passing programs, {os.cpu_count()} CPU cores ({cpu_name()})",
        ["mode", "workers", "passed", "seconds", "executions/s", "ratio vs baseline", "p50 ms", "p95 ms"],
        [
            [
                r["mode"],
                str(r["workers"]),
                f"{r['passed']}/{r['programs']}",
                f"{r['seconds']:.2f}",
                f"{r['executions_per_s']:.1f}",
                f"{r['ratio_vs_baseline']:.2f}x",
                f"{r['p50_ms']:.1f}",
                f"{r['p95_ms']:.1f}",
            ]
            for r in rows
        ],
        sections={i for i, r in enumerate(rows) if r["mode"].startswith("sandbox")},
        use_rich=True,
    )
    print(f"Active protections: {', '.join(probe.protections)}")
    print(f"Not active: {'; '.join(probe.inactive) or 'none'}")
    print(
        f"Start-up alone (median of 20): program `python -I` {startup['program_python_I_ms']:.1f} ms, launcher "
        f"`python -I -S` {startup['launcher_python_I_S_ms']:.1f} ms; load average at start "
        f"{load_start[0]:.2f}, at end {load_end[0]:.2f}; total {total_s:.1f} s"
    )

    results = {
        "benchmark": "bench/sandbox.py",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {"programs": args.programs, "workers": args.workers},
        "environment": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "euid": os.geteuid(),
            "load_average_start": load_start,
            "load_average_end": load_end,
        },
        "sandbox_config": cfg.model_dump(),
        "protections": list(probe.protections),
        "inactive": list(probe.inactive),
        "rows": rows,
        "startup_ms": startup,
        "total_wall_s": round(total_s, 3),
    }
    write_json(args.out_json, results)
    return 0 if all(r["passed"] == r["programs"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
