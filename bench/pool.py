"""Benchmark of the snippet-pool stage and of MinHash signature computation, on one process (one core).

What it measures:

1. A whole pool build from the running interpreter's standard library with `synth_core.pool.build_pool`
   (in-process, step after step, into a temporary storage root): rows, seconds and rows/s of each step
   (ingest, dedup, decontaminate; from the pool manifest's `stats`), the total wall time of
   `build_pool`, and the process's peak RSS.
2. `synth_core.dedup.compute_signatures` (datasketch `MinHash.generator`, one shared permutation table,
   xxh32) against the baseline `compute_signatures_loop` (a new `MinHash` per text and one `update` call
   per shingle), on the same texts in the same run: the snippets the ingest step kept BEFORE dedup (the
   ingest dataset's rows whose `reject_reason` is null), so that near-duplicate pairs exist to be found.
   The baseline runs on all of them, or on a seeded random subset (`--loop-subset`), in which case the
   generator is timed both on all texts and on that same subset; the speedup is the ratio of signatures/s
   on the same texts. Shingling alone (`shingle_set`, the same code on both sides) is timed too: it bounds
   the achievable speedup.
   Checks: the two signature matrices are identical (`numpy.array_equal`) on the subset, and
   `find_duplicates` gives identical (row, duplicate-of row) pairs from either matrix. Goal: speedup >= 10x.

Results are printed as a table and written as JSON (default bench/results/pool.json).

    python bench/pool.py [--per-file 14] [--loop-subset 0] [--out-json bench/results/pool.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GOAL_SPEEDUP = 10.0
MIN_TEXTS = 20_000
DEFAULT_OUT_JSON = Path(__file__).resolve().parent / "results" / "pool.json"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--per-file", type=int, default=14, help="Snippets cut per source file (pool.snippets.per_file)."
    )
    parser.add_argument(
        "--loop-subset",
        type=int,
        default=0,
        help="Texts the baseline loop is timed on (a seeded random subset); 0 = all texts (the default).",
    )
    parser.add_argument("--out-json", type=Path, default=DEFAULT_OUT_JSON, help="Where to write the JSON results.")
    return parser.parse_args(argv)


def build(per_file: int, root: str) -> dict[str, Any]:
    """Build the stdlib pool under `root`; return the plan, manifests and timings."""
    from synth_core.config import RunConfig
    from synth_core.pool import build_pool, plan_pool
    from synth_core.storage import read_manifest

    cfg = RunConfig()
    cfg.storage.root = root
    cfg.pool.snippets.per_file = per_file
    plan = plan_pool(cfg)
    t0 = time.perf_counter()
    out_uri = build_pool(cfg)
    total_s = time.perf_counter() - t0
    manifest = read_manifest(out_uri, cfg.storage)
    steps = []
    for s in manifest.stats.get("steps", []):
        wall = float(s["wall_s"])
        steps.append({**s, "rows_per_s": round(s["rows"] / wall, 1) if wall > 0 else None})
    return {
        "cfg": cfg,
        "plan": plan,
        "out_uri": out_uri,
        "total_s": total_s,
        "steps": steps,
        "funnel": manifest.funnel,
        "ingest_funnel": read_manifest(plan.targets.ingest_uri, cfg.storage).funnel,
        "dedup_funnel": read_manifest(plan.targets.dedup_uri, cfg.storage).funnel,
        "pool_peak_rss_mb": manifest.stats.get("peak_rss_mb"),
        "peak_rss_mb": peak_rss_mb(),
    }


def pre_dedup_texts(built: dict[str, Any]):
    """The snippets ingest kept (before dedup), their ids, and their stored signatures, in ingest order."""
    import numpy as np

    from synth_core.storage import read_dataset

    cfg = built["cfg"]
    table = read_dataset(
        built["plan"].targets.ingest_uri,
        columns=["snippet_id", "content", "reject_reason", "minhash"],
        kept_only=True,
        storage=cfg.storage,
    )
    texts = table.column("content").to_pylist()
    ids = table.column("snippet_id").to_pylist()
    stored = table.column("minhash").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    stored = np.asarray(stored, dtype=np.uint32).reshape(len(texts), cfg.dedup.num_perm)
    return texts, ids, stored


def timed(fn, *args) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


def pairs(dups) -> list[tuple[int, str, int]]:
    """(row, reason, index of the kept row it duplicates) for every removed row."""
    return [(i, d.reason, d.index_of) for i, d in enumerate(dups) if d is not None]


def bench_signatures(texts: list[str], ids: list[str], stored, cfg, loop_subset: int) -> dict[str, Any]:
    """Time generator vs loop signatures on the same texts; check signatures and duplicate pairs agree."""
    import numpy as np

    from synth_core.dedup import (
        NEAR_DUPLICATE,
        compute_signatures,
        compute_signatures_loop,
        find_duplicates,
        shingle_set,
    )

    n = len(texts)
    m = n if loop_subset <= 0 or loop_subset >= n else loop_subset
    subset = sorted(random.Random(0).sample(range(n), m)) if m < n else list(range(n))
    sub_texts = [texts[i] for i in subset]
    sub_ids = [ids[i] for i in subset]

    # Shingling (tokenise, n-grams, encode) is the same code in both paths: timed alone, it bounds the speedup.
    _, shingle_s = timed(lambda: [shingle_set(t, cfg.dedup.shingle_size) for t in sub_texts])
    fast_all, fast_all_s = timed(compute_signatures, texts, cfg.dedup)
    rss_fast_all = peak_rss_mb()
    if m < n:
        fast_sub, fast_sub_s = timed(compute_signatures, sub_texts, cfg.dedup)
    else:
        fast_sub, fast_sub_s = fast_all, fast_all_s
    rss_fast_sub = peak_rss_mb()
    loop_sub, loop_sub_s = timed(compute_signatures_loop, sub_texts, cfg.dedup)
    rss_loop = peak_rss_mb()

    dups_fast_sub, find_sub_s = timed(find_duplicates, sub_ids, fast_sub, cfg.dedup)
    dups_loop_sub = find_duplicates(sub_ids, loop_sub, cfg.dedup)
    dups_fast_all, find_all_s = timed(find_duplicates, ids, fast_all, cfg.dedup)
    rss_find = peak_rss_mb()

    pairs_fast, pairs_loop = pairs(dups_fast_sub), pairs(dups_loop_sub)
    near_fast = sum(r == NEAR_DUPLICATE for _, r, _ in pairs_fast)
    pairs_all = pairs(dups_fast_all)
    loop_rate = m / loop_sub_s
    return {
        "texts": n,
        "loop_subset": m,
        "shingle_set_subset": {"rows": m, "seconds": shingle_s, "rows_per_s": m / shingle_s},
        "loop": {"rows": m, "seconds": loop_sub_s, "rows_per_s": loop_rate, "peak_rss_mb": rss_loop},
        "generator_subset": {
            "rows": m,
            "seconds": fast_sub_s,
            "rows_per_s": m / fast_sub_s,
            "peak_rss_mb": rss_fast_sub,
        },
        "generator_all": {"rows": n, "seconds": fast_all_s, "rows_per_s": n / fast_all_s, "peak_rss_mb": rss_fast_all},
        "find_duplicates_all": {
            "rows": n,
            "seconds": find_all_s,
            "rows_per_s": n / find_all_s,
            "peak_rss_mb": rss_find,
            "exact_pairs": sum(r != NEAR_DUPLICATE for _, r, _ in pairs_all),
            "near_pairs": sum(r == NEAR_DUPLICATE for _, r, _ in pairs_all),
        },
        "find_duplicates_subset_s": find_sub_s,
        "speedup_same_subset": (m / fast_sub_s) / loop_rate,
        "speedup_all_vs_subset": (n / fast_all_s) / loop_rate,
        # The speedup of the MinHash part alone, shared shingling time subtracted from both sides.
        "speedup_minhash_only": (loop_sub_s - shingle_s) / (fast_sub_s - shingle_s)
        if fast_sub_s > shingle_s
        else None,
        "checks": {
            "signatures_equal_on_subset": bool(np.array_equal(fast_sub, loop_sub)),
            "generator_subset_equals_generator_all": bool(np.array_equal(fast_sub, fast_all[subset])),
            "generator_all_equals_ingest_minhash": bool(np.array_equal(fast_all, stored)),
            "pairs_equal_on_subset": pairs_fast == pairs_loop,
            "pairs_on_subset": len(pairs_fast),
            "near_pairs_on_subset": near_fast,
        },
    }


def fmt_num(x: float | None, digits: int = 0) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def report(args: argparse.Namespace, built: dict[str, Any], sig: dict[str, Any], wall_s: float) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    loop_rate = sig["loop"]["rows_per_s"]
    table = Table(title=f"bench/pool.py — stdlib pool (per_file={args.per_file}), one process")
    for col, justify in (
        ("step", "left"),
        ("rows", "right"),
        ("seconds", "right"),
        ("rows/s", "right"),
        ("ratio vs baseline", "right"),
        ("peak RSS MiB", "right"),
    ):
        table.add_column(col, justify=justify)
    pool_rss = built["pool_peak_rss_mb"]
    for s in built["steps"]:
        table.add_row(
            f"pool: {s['step']}",
            fmt_num(s["rows"]),
            fmt_num(s["wall_s"], 2),
            fmt_num(s["rows_per_s"]),
            "—",
            fmt_num(pool_rss),
        )
    kept = built["funnel"]["kept"]
    table.add_row(
        "pool: build_pool total (kept rows)",
        fmt_num(kept),
        fmt_num(built["total_s"], 2),
        fmt_num(kept / built["total_s"]),
        "—",
        fmt_num(built["peak_rss_mb"]),
        end_section=True,
    )
    m, n = sig["loop_subset"], sig["texts"]
    which = "all" if m == n else "subset"
    table.add_row(
        f"shingle_set only (shared by both, {which})",
        fmt_num(m),
        fmt_num(sig["shingle_set_subset"]["seconds"], 2),
        fmt_num(sig["shingle_set_subset"]["rows_per_s"]),
        "—",
        "—",
    )
    table.add_row(
        f"signatures: loop (baseline, {which})",
        fmt_num(m),
        fmt_num(sig["loop"]["seconds"], 2),
        fmt_num(loop_rate),
        "1.0x",
        fmt_num(sig["loop"]["peak_rss_mb"]),
    )
    if m < n:
        table.add_row(
            "signatures: generator (subset)",
            fmt_num(m),
            fmt_num(sig["generator_subset"]["seconds"], 2),
            fmt_num(sig["generator_subset"]["rows_per_s"]),
            f"{sig['speedup_same_subset']:.1f}x (goal >= {GOAL_SPEEDUP:g}x)",
            fmt_num(sig["generator_subset"]["peak_rss_mb"]),
        )
    table.add_row(
        "signatures: generator (all)",
        fmt_num(n),
        fmt_num(sig["generator_all"]["seconds"], 2),
        fmt_num(sig["generator_all"]["rows_per_s"]),
        f"{sig['speedup_all_vs_subset']:.1f}x" + ("" if m < n else f" (goal >= {GOAL_SPEEDUP:g}x)"),
        fmt_num(sig["generator_all"]["peak_rss_mb"]),
    )
    fd = sig["find_duplicates_all"]
    table.add_row(
        "find_duplicates (all, generator sigs)",
        fmt_num(n),
        fmt_num(fd["seconds"], 2),
        fmt_num(fd["rows_per_s"]),
        "—",
        fmt_num(fd["peak_rss_mb"]),
    )
    console.print(table)

    checks = sig["checks"]
    goal_met = sig["speedup_same_subset"] >= GOAL_SPEEDUP
    ok = "[green]yes[/green]", "[red]NO[/red]"
    console.print(
        f"Pool funnel: {built['funnel']['rows_in']:,} rows in, {kept:,} kept; rejected {built['funnel']['rejected']}"
    )
    console.print(
        f"Signature texts: {n:,} snippets kept by ingest (before dedup); loop timed on "
        + (f"all {n:,}" if m == n else f"{m:,} of them (seeded random subset)")
        + "; peak RSS is the process peak so far (cumulative); one process, so rows/s is per core."
    )
    scope = f"all {n:,} texts" if m == n else f"the {m:,}-text subset"
    minhash_only = sig["speedup_minhash_only"]
    console.print(
        f"Speedup generator vs loop on the same {m:,} texts: [bold]{sig['speedup_same_subset']:.1f}x[/bold] "
        f"(goal >= {GOAL_SPEEDUP:g}x: {'[green]MET[/green]' if goal_met else '[red]NOT MET[/red]'}); "
        f"MinHash part alone (shingling subtracted): " + (f"{minhash_only:.1f}x" if minhash_only is not None else "—")
    )
    console.print(
        f"Signatures identical on {scope}: {ok[not checks['signatures_equal_on_subset']]}; "
        f"generator subset == generator all: {ok[not checks['generator_subset_equals_generator_all']]}; "
        f"generator all == ingest minhash column: {ok[not checks['generator_all_equals_ingest_minhash']]}"
    )
    console.print(
        f"find_duplicates pairs identical on {scope}: {ok[not checks['pairs_equal_on_subset']]} "
        f"({checks['pairs_on_subset']:,} removed rows, {checks['near_pairs_on_subset']:,} near); on all {n:,}: "
        f"{fd['exact_pairs']:,} exact + {fd['near_pairs']:,} near (dedup step funnel: "
        f"{built['dedup_funnel']['rejected'].get('exact_duplicate', 0):,} exact + "
        f"{built['dedup_funnel']['rejected'].get('near_duplicate', 0):,} near)"
    )
    console.print(f"Total benchmark wall time: {wall_s:.1f} s")

    import datasketch

    return {
        "benchmark": "bench/pool.py",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {"per_file": args.per_file, "loop_subset": args.loop_subset},
        "environment": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "datasketch": datasketch.__version__,
            "processes": 1,
        },
        "pool": {
            "steps": built["steps"],
            "total_s": round(built["total_s"], 3),
            "kept": kept,
            "funnel": built["funnel"],
            "ingest_funnel": built["ingest_funnel"],
            "dedup_funnel": built["dedup_funnel"],
            "peak_rss_mb_manifest": pool_rss,
            "peak_rss_mb": round(built["peak_rss_mb"], 1),
        },
        "signatures": sig,
        "goal": {"speedup_min": GOAL_SPEEDUP, "speedup": sig["speedup_same_subset"], "met": goal_met},
        "total_wall_s": round(wall_s, 3),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-pool-") as root:
        built = build(args.per_file, root)
        texts, ids, stored = pre_dedup_texts(built)
        if len(texts) < MIN_TEXTS:
            print(
                f"warning: only {len(texts):,} snippets before dedup (< {MIN_TEXTS:,}); raise --per-file",
                file=sys.stderr,
            )
        sig = bench_signatures(texts, ids, stored, built["cfg"], args.loop_subset)
    results = report(args, built, sig, time.perf_counter() - t0)
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(results, indent=2, default=float) + "\n", encoding="utf-8")
    print(f"wrote {args.out_json}")
    checks = sig["checks"]
    return 0 if checks["signatures_equal_on_subset"] and checks["pairs_equal_on_subset"] else 1


if __name__ == "__main__":
    sys.exit(main())
