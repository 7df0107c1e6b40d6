"""pass@k: the unbiased estimator of Chen et al. 2021 (1 - C(n-c, k) / C(n, k), in its stable product form), and
the per-benchmark summary of an evaluation's rows (pass@1 of the greedy run, pass@k of the sampled one).

What it leaves to others: producing the rows (stage.py); it knows no model and runs nothing.
"""

from __future__ import annotations

from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c correct among n samples: 1 - C(n-c, k) / C(n, k), computed as
    1 - prod_{i=n-c+1..n} (1 - k/i) (no huge binomials; Chen et al. 2021)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def summarize(rows: list[dict[str, Any]], ks: list[int]) -> dict[str, dict[str, Any]]:
    """Per benchmark: problems, pass@1 (greedy), pass@k of the sampled completions (k <= their n)."""
    out: dict[str, dict[str, Any]] = {}
    by_bench: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_bench.setdefault(r["benchmark"], []).append(r)
    for bench, brows in by_bench.items():
        greedy = [r for r in brows if r["mode"] == "greedy"]
        entry: dict[str, Any] = {"problems": len({r["task_id"] for r in brows})}
        if greedy:
            entry["pass@1"] = round(sum(r["passed"] for r in greedy) / len(greedy), 4)
            entry["greedy_passed"] = sum(r["passed"] for r in greedy)
        sampled: dict[str, list[bool]] = {}
        for r in brows:
            if r["mode"] == "sampled":
                sampled.setdefault(r["task_id"], []).append(bool(r["passed"]))
        if sampled:
            n = min(len(v) for v in sampled.values())
            entry["n"] = n
            for k in sorted(set(ks)):
                if k <= n:
                    vals = [pass_at_k(len(v), sum(v), k) for v in sampled.values()]
                    entry[f"pass@{k} (sampled)"] = round(sum(vals) / len(vals), 4)
        out[bench] = entry
    return out
