"""Benchmark of the execution sandbox (issues 7 and 17): executions/s of the sandbox before and after issue 17's
protections, and of plain subprocess runs, in ONE run, interleaved.

What it measures, on the same programs: N small passing programs (a function and two asserts, each program
different) run

- "baseline": `subprocess.run([python, "-c", code], capture_output=True)`, no protection at all (the same
  interpreter, with its site-packages, as the sandbox's program gets);
- "before": `run_program(code, cfg)` of synth_core/sandbox.py as it was at `--before-rev` (default: the commit
  before issue 17), loaded from git into this process under another name (its launcher is its own source);
- "after": `synth_core.sandbox.run_program(code, cfg)` of this tree (issue 17: read-only mounts, one tmpfs for
  all writes, /proc with hidepid, RLIMIT_NOFILE, no_new_privs, seccomp),

both with the default SandboxConfig, each with 1 and 2 workers (threads, each running one program at a time:
`run_programs` is exactly that thread pool over `run_program`). Because the machine is shared and its load
moves, the three modes are interleaved: repetition r runs baseline, before, after (the order rotating with r)
at one worker count, then the next. Reported per mode and worker count: executions/s (median over the
repetitions of programs / wall time of the batch, and every repetition's), the ratio after/before (the issue's
bar: no more than a 10% drop) and sandbox/baseline, and the p50/p95 latency of one program. Every program
must pass in every batch: the benchmark fails otherwise. The load average at the start and the end is
recorded.

Results are printed as a table and written as JSON (default bench/results/sandbox.json).

    python bench/sandbox.py [--programs 100] [--repeats 3] [--workers 1 2] [--before-rev 1d32bff]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

from common import RESULTS_DIR, cpu_name, print_table, write_json

DEFAULT_OUT_JSON = RESULTS_DIR / "sandbox.json"
BEFORE_REV = "1d32bff"  # main just before issue 17 (the sandbox of issue 7 and its follow-ups)
MODES = ("baseline", "before", "after")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--programs", type=int, default=100, help="Programs run in each batch.")
    parser.add_argument("--repeats", type=int, default=3, help="Batches of each mode at each worker count.")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Worker counts to run.")
    parser.add_argument(
        "--before-rev", default=BEFORE_REV, help="Git revision whose synth_core/sandbox.py is the 'before' column."
    )
    parser.add_argument("--out-json", type=Path, default=DEFAULT_OUT_JSON, help="Where to write the JSON results.")
    return parser.parse_args(argv)


def load_sandbox_at(rev: str) -> ModuleType:
    """synth_core/sandbox.py as it was at `rev`, imported as a module of its own (it imports synth_core.config
    of this tree, whose SandboxConfig only added fields)."""
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        ["git", "-C", str(repo), "show", f"{rev}:synth_core/sandbox.py"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:  # a shallow clone or an unpacked release has no history to compare with
        raise SystemExit(f"no 'before' sandbox at --before-rev {rev}: {proc.stderr.strip()}")
    source = proc.stdout
    folder = Path(tempfile.mkdtemp(prefix="scoder-bench-sandbox-"))
    path = folder / f"sandbox_{rev}.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(f"sandbox_{rev}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


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


def run_batch(fn: Callable[[str], bool], codes: list[str], workers: int) -> dict[str, Any]:
    """One batch: every program through `fn`, `workers` at once; its wall time, passes and latencies."""

    def timed(code: str) -> tuple[bool, float]:
        t0 = time.perf_counter()
        ok = fn(code)
        return ok, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(timed, codes))
    wall = time.perf_counter() - t0
    return {"seconds": wall, "passed": sum(ok for ok, _ in results), "latencies": [lat for _, lat in results]}


def summarize(mode: str, workers: int, batches: list[dict[str, Any]], programs: int) -> dict[str, Any]:
    rates = [programs / b["seconds"] for b in batches]
    latencies = sorted(lat for b in batches for lat in b["latencies"])
    return {
        "mode": mode,
        "workers": workers,
        "programs": programs * len(batches),
        "passed": sum(b["passed"] for b in batches),
        "executions_per_s": statistics.median(rates),
        "executions_per_s_each": rates,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from synth_core.config import SandboxConfig
    from synth_core.sandbox import probe_sandbox, run_program

    old = load_sandbox_at(args.before_rev)
    cfg = SandboxConfig()
    codes = make_programs(args.programs)
    probe, probe_before = probe_sandbox(cfg), old.probe_sandbox(cfg)
    if probe.status != "passed" or probe_before.status != "passed":
        print(f"the sandbox cannot run a program here: {probe} / {probe_before}", file=sys.stderr)
        return 1
    fns: dict[str, Callable[[str], bool]] = {
        "baseline": run_baseline,
        "before": lambda code: old.run_program(code, cfg).passed,
        "after": lambda code: run_program(code, cfg).passed,
    }
    for fn in fns.values():
        fn(codes[0])  # warm-up
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    rows = []
    for workers in args.workers:
        batches: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
        for rep in range(args.repeats):
            order = MODES[rep % 3 :] + MODES[: rep % 3]  # each mode goes first, second and third in turn
            for mode in order:
                batches[mode].append(run_batch(fns[mode], codes, workers))
        summary = {m: summarize(m, workers, batches[m], args.programs) for m in MODES}
        for m in MODES:
            summary[m]["after_vs_before"] = summary[m]["executions_per_s"] / summary["before"]["executions_per_s"]
            summary[m]["vs_baseline"] = summary[m]["executions_per_s"] / summary["baseline"]["executions_per_s"]
            rows.append(summary[m])
    total_s = time.perf_counter() - t_start
    load_end = os.getloadavg()
    shutil.rmtree(Path(old.__file__).parent, ignore_errors=True)

    print_table(
        f"bench/sandbox.py — {args.programs} small passing programs x {args.repeats} interleaved repetitions, "
        f"{os.cpu_count()} CPU cores ({cpu_name()})",
        ["mode", "workers", "passed", "executions/s (median)", "each repetition", "vs before", "vs baseline", "p50 ms"]
        + ["p95 ms"],
        [
            [
                r["mode"],
                str(r["workers"]),
                f"{r['passed']}/{r['programs']}",
                f"{r['executions_per_s']:.1f}",
                " ".join(f"{x:.1f}" for x in r["executions_per_s_each"]),
                f"{r['after_vs_before']:.3f}x",
                f"{r['vs_baseline']:.2f}x",
                f"{r['p50_ms']:.1f}",
                f"{r['p95_ms']:.1f}",
            ]
            for r in rows
        ],
        sections={i for i, r in enumerate(rows) if r["mode"] == "after"},
        use_rich=True,
    )
    new = [p for p in probe.protections if p not in probe_before.protections]
    print(f"Active after: {', '.join(probe.protections)} (new: {', '.join(new)})")
    print(f"Not active after: {'; '.join(probe.inactive) or 'none'}")
    for r in rows:
        if r["mode"] == "after":
            drop = 100 * (1 - r["after_vs_before"])
            print(f"{r['workers']} worker(s): after/before = {r['after_vs_before']:.3f} ({drop:+.1f}% drop; bar: 10%)")
    print(f"Load average (1 min) at start {load_start[0]:.2f}, at end {load_end[0]:.2f}; total {total_s:.1f} s")

    results = {
        "benchmark": "bench/sandbox.py",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {"programs": args.programs, "repeats": args.repeats, "workers": args.workers},
        "before_rev": args.before_rev,
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
        "protections_before": list(probe_before.protections),
        "inactive": list(probe.inactive),
        "rows": rows,
        "total_wall_s": round(total_s, 3),
    }
    write_json(args.out_json, results)
    return 0 if all(r["passed"] == r["programs"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
