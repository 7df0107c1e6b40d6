"""Leakage: how much of what a student trains on overlaps each evaluation benchmark.

training_data reads the (instruction, response) pairs a student trains on (a dataset's kept rows, a reference file
or reference:builtin, as synth_core.train reads them) and their fingerprint; leakage_report matches them against the
decontamination index (synth_core.decontam) and measures each benchmark item's n-gram coverage.

What it leaves to others: the index and its thresholds (synth_core.decontam); it removes nothing.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from synth_core.config import RunConfig
from synth_core.evaluate.problems import benchmark_source


def training_data(cfg: RunConfig, data: str) -> tuple[list[tuple[str, str]], str]:
    """(instruction, response) pairs of what a student trains on (a dataset's kept rows, a reference file or
    reference:builtin, as synth_core.train reads them) and their fingerprint."""
    from synth_core.train import load_training_rows

    rows, fps = load_training_rows([data], cfg)
    return [(r["instruction"] or "", r["response"] or "") for r in rows], fps[0]


def leakage_report(cfg: RunConfig, data_uri: str) -> dict[str, dict[str, Any]]:
    """N-gram overlap of training data's rows (instruction, response) with each evaluation benchmark.

    Per benchmark: rows whose instruction or response the decontamination index matches (exact substring or
    n-gram overlap >= decontam.ngram_threshold of the smaller side), the benchmark items they hit, and the
    coverage of each item (share of its prompt + solution n-grams found anywhere in the dataset).
    """
    from synth_core.decontam import BenchmarkIndex, load_benchmark
    from synth_core.text import token_ngrams, tokenize_code

    texts, _ = training_data(cfg, data_uri)
    n = cfg.decontam.ngram_size
    data_grams = {hash(g) for i, r in texts for t in (i, r) for g in token_ngrams(tokenize_code(t), n)}
    report: dict[str, dict[str, Any]] = {}
    for spec in cfg.evaluation.benchmarks:
        benchmark_source(spec)  # an unset file variable is an EvalError, as in plan_eval
        items = load_benchmark(spec, cfg.storage)
        name = items[0].label.split(":", 1)[0]
        index = BenchmarkIndex(items, cfg.decontam)
        hits: Counter[str] = Counter()
        flagged = 0
        for instruction, response in texts:
            m = index.match(instruction) or index.match(response)
            if m is not None:
                flagged += 1
                hits[m.label] += 1
        coverage = []
        for item in items:
            text = item.texts.get("full") or item.texts.get("solution") or item.texts.get("prompt", "")
            grams = {hash(g) for g in token_ngrams(tokenize_code(text), n)}
            coverage.append(len(grams & data_grams) / len(grams) if grams else 0.0)
        report[name] = {
            "rows": len(texts),
            "rows_overlapping": flagged,
            "share_overlapping": round(flagged / len(texts), 4) if texts else 0.0,
            "items": len(items),
            "items_hit": len(hits),
            "mean_item_coverage": round(sum(coverage) / len(coverage), 4) if coverage else 0.0,
            "max_item_coverage": round(max(coverage, default=0.0), 4),
            "items_covered_over_threshold": sum(c >= cfg.decontam.ngram_threshold for c in coverage),
            "top_items": [label for label, _ in hits.most_common(5)],
        }
    return report
