"""Human-readable views of a dataset's manifest: funnel, throughput and a few rows.

Used by the CLI (`scoder inspect`, end-of-stage summaries) and by the flows' Prefect artifacts, so
the terminal and the UI show the same numbers. Plain rich renderables and markdown; no I/O here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa
    from rich.table import Table

    from synth_core.storage import Manifest


def funnel_rows(funnel: dict[str, Any]) -> list[tuple[str, int, str]]:
    """(label, count, percent of rows in) for rows in, kept and each reject reason."""
    rows_in = funnel.get("rows_in", 0) or 0

    def pct(n: int) -> str:
        return f"{100.0 * n / rows_in:.1f}%" if rows_in else "-"

    out = [("rows in", rows_in, pct(rows_in)), ("kept", funnel.get("kept", 0), pct(funnel.get("kept", 0)))]
    out += [(f"rejected: {r}", n, pct(n)) for r, n in funnel.get("rejected", {}).items()]
    short = funnel.get("seed_shortfall")
    if short:  # the pool had fewer seed snippets than the stage asked for (round.seed_shortfall: warn)
        out.append(
            (f"seed snippets short (asked {short['requested']:,}, got {short['available']:,})", short["short"], "-")
        )
    return out


def funnel_table(funnel: dict[str, Any], title: str = "funnel") -> Table:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("rows")
    table.add_column("count", justify="right")
    table.add_column("share", justify="right")
    for label, n, share in funnel_rows(funnel):
        table.add_row(label, f"{n:,}", share)
    return table


def funnel_markdown(funnel: dict[str, Any]) -> list[dict[str, Any]]:
    """The funnel as records, the shape of a Prefect table artifact."""
    return [{"rows": label, "count": n, "share": share} for label, n, share in funnel_rows(funnel)]


def steps_table(stats: dict[str, Any]) -> Table | None:
    from rich.table import Table

    steps = stats.get("steps") or []
    if not steps:
        flat = {k: v for k, v in stats.items() if isinstance(v, int | float | str) and v is not None}
        if not flat:
            return None
        table = Table(title="throughput", show_header=False)
        for k, v in flat.items():
            table.add_row(k, str(v))
        return table
    keys = [
        k
        for k in ("step", "shards", "cached_shards", "rows", "work_s", "wall_s", "rows_per_s")
        if any(k in s for s in steps)
    ]
    table = Table(title=f"throughput (peak RSS {stats.get('peak_rss_mb', '?')} MiB)")
    for k in keys:
        table.add_column(k, justify="left" if k == "step" else "right")
    for s in steps:
        table.add_row(*[str(s.get(k, "")) for k in keys])
    return table


def manifest_table(uri: str, manifest: Manifest) -> Table:
    import datetime

    from rich.table import Table

    table = Table(title=f"dataset {uri}", show_header=False)
    created = datetime.datetime.fromtimestamp(manifest.created_at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    for k, v in (
        ("stage", manifest.stage),
        ("fingerprint", manifest.fingerprint),
        ("rows", f"{manifest.num_rows:,}"),
        ("parts", str(len(manifest.parts))),
        ("created", created),
        ("code version", manifest.code_version),
        ("inputs", ", ".join(manifest.inputs)),
        ("columns", ", ".join(f"{f['name']}: {f['type']}" for f in manifest.schema)),
    ):
        table.add_row(k, v)
    return table


def sample_rows(table: pa.Table, kept: int = 3, per_reason: int = 1) -> list[dict[str, Any]]:
    """A few kept rows and `per_reason` rejected rows of each reason, in table order."""
    rows: list[dict[str, Any]] = []
    seen: dict[str | None, int] = {}
    reasons = (
        table.column("reject_reason").to_pylist() if "reject_reason" in table.column_names else [None] * table.num_rows
    )
    for i, r in enumerate(reasons):
        limit = kept if r is None else per_reason
        if seen.get(r, 0) < limit:
            seen[r] = seen.get(r, 0) + 1
            rows.append(table.slice(i, 1).to_pylist()[0])
    return rows


def score_histogram(values: Sequence[float], bins: int = 10) -> list[dict[str, Any]]:
    """Equal-width bins from the lowest to the highest score: [{"from", "to", "rows"}] (empty for no scores)."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    return [{"from": lo + i * width, "to": lo + (i + 1) * width, "rows": n} for i, n in enumerate(counts)]


def histogram_markdown(pairs: Sequence[tuple[float | None, str | None]], label: str, bins: int = 10) -> str:
    """A markdown histogram of (value, reject_reason) pairs: bins, rows, how many of them were kept, a bar.
    Rows without a value are left out."""
    scored = [(v, r) for v, r in pairs if v is not None]
    hist = score_histogram([v for v, _ in scored], bins)
    if not hist:
        return "No row was scored."
    lines = [f"| {label} | rows | kept | |", "|---|---:|---:|---|"]
    top = max(h["rows"] for h in hist)
    for i, h in enumerate(hist):
        last = i == len(hist) - 1
        kept = sum(1 for v, r in scored if r is None and h["from"] <= v and (v < h["to"] or last))
        bar = "█" * round(20 * h["rows"] / top)
        lines.append(f"| {h['from']:.4f} – {h['to']:.4f} | {h['rows']} | {kept} | {bar} |")
    return "\n".join(lines)
