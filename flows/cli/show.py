"""What `scoder` commands print on stdout: a dataset's manifest, funnel, throughput and a few rows, and an
evaluation's pass@k and leakage tables (rich tables; the URI a command prints last stays on its own line).

The tables' contents come from synth_core.report and synth_core.evaluate; this module only lays them out.
"""

from __future__ import annotations

from typing import Any


def print_eval(uri: str, storage: Any) -> None:
    """The evaluation output at `uri`: pass@k per benchmark and the training data's n-gram leakage, as tables."""
    from rich.console import Console
    from rich.table import Table

    from synth_core.evaluate import leakage_rows, summary_rows
    from synth_core.storage import read_manifest

    stats = read_manifest(uri, storage).stats
    console = Console()
    for title, records in (
        (f"evaluation of {stats.get('model')}", summary_rows(stats)),
        ("leakage: n-gram overlap of the training data with each benchmark", leakage_rows(stats)),
    ):
        if not records:
            continue
        table = Table(title=title)
        for key in records[0]:
            table.add_column(key, justify="left" if key == "benchmark" else "right")
        for rec in records:
            table.add_row(*["—" if v is None else str(v) for v in rec.values()])
        console.print(table)


def print_dataset(uri: str, storage: Any, rows: bool = True, limit: int = 3) -> None:
    """The dataset at `uri`: its manifest, funnel and steps (throughput) tables, then (`rows`) up to `limit` kept
    rows plus one per reject reason."""
    from rich.console import Console

    from synth_core.report import funnel_table, manifest_table, sample_rows, steps_table
    from synth_core.storage import read_dataset, read_manifest

    console = Console()
    manifest = read_manifest(uri, storage)
    console.print(manifest_table(uri, manifest))
    if manifest.funnel:
        console.print(funnel_table(manifest.funnel))
    steps = steps_table(manifest.stats)
    if steps is not None:
        console.print(steps)
    if rows:
        table = read_dataset(uri, storage=storage)
        for row in sample_rows(table, kept=limit):
            status = "kept" if row.get("reject_reason") is None else f"rejected: {row['reject_reason']}"
            where = row.get("source", "")
            if row.get("line_start"):
                where += f":{row['line_start']}-{row['line_end']}"
            console.rule(f"{status}  {where}")
            for k, v in row.items():
                if k in ("content", "source", "line_start", "line_end") or v is None:
                    continue
                console.print(f"[bold]{k}[/bold]: {v}", highlight=False)
            if row.get("content"):
                content = row["content"]
                console.print(
                    content if len(content) < 1200 else content[:1200] + "\n...", markup=False, highlight=False
                )
