"""Views of evaluations: the summary and leakage tables (records for the CLI and artifacts, markdown), the records
that compare evaluations across runs (iterations, ablations) and their pass@1 plot.

What it leaves to others: computing the numbers (stage.py, passk.py, leakage.py); it reads manifests only.
"""

from __future__ import annotations

from typing import Any, Literal

from synth_core.config import RunConfig
from synth_core.evaluate.errors import EvalError


def summary_rows(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per benchmark: problems, pass@1, pass@k and the throughput, for tables and artifacts."""
    gen, ex = stats.get("generation", {}), stats.get("execution", {})
    out = []
    for bench, entry in stats.get("benchmarks", {}).items():
        rec: dict[str, Any] = {"benchmark": bench, "problems": entry["problems"]}
        rec |= {k: v for k, v in entry.items() if k.startswith("pass@")}
        rec |= {
            "gen problems/s": gen.get("greedy_problems_per_s") or gen.get("sampled_problems_per_s"),
            "exec problems/s": ex.get("problems_per_s"),
        }
        out.append(rec)
    return out


def leakage_rows(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per benchmark of the leakage report (empty without one)."""
    return [
        {
            "benchmark": bench,
            "rows": r["rows"],
            "rows overlapping": r["rows_overlapping"],
            "share": r["share_overlapping"],
            "items hit": f"{r['items_hit']}/{r['items']}",
            "mean item coverage": r["mean_item_coverage"],
            "max item coverage": r["max_item_coverage"],
        }
        for bench, r in (stats.get("leakage") or {}).items()
    ]


def records_markdown(records: list[dict[str, Any]]) -> str:
    """A markdown table of records sharing their keys (a Prefect markdown artifact)."""
    if not records:
        return ""
    keys = list(records[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + " |" for r in records]
    return "\n".join(lines)


def results_markdown(uri: str, stats: dict[str, Any]) -> str:
    """The evaluation's summary (and leakage report) as markdown."""
    text = f"# Evaluation of `{stats.get('model')}`\n\nResults: `{uri}`\n\n" + records_markdown(summary_rows(stats))
    leak = leakage_rows(stats)
    if leak:
        text += "\n\n## Leakage (n-gram overlap of the training data with each benchmark)\n\n" + records_markdown(leak)
    return text + "\n"


def comparison_records(evals: dict[str, str], cfg: RunConfig | None = None) -> list[dict[str, Any]]:
    """One record per (run, benchmark) from evaluation outputs named by label (an iteration, an ablation), in
    the order given: the table of a round's report and the input of plot_pass_at_1."""
    from synth_core.storage import read_manifest

    records = []
    for label, uri in evals.items():
        stats = read_manifest(uri, cfg.storage if cfg else None).stats
        for bench, entry in stats.get("benchmarks", {}).items():
            records.append(
                {"run": label, "benchmark": bench, "problems": entry["problems"]}
                | {k: v for k, v in entry.items() if k.startswith("pass@")}
            )
    return records


def plot_pass_at_1(
    records: list[dict[str, Any]],
    out: str,
    metric: str = "pass@1",
    kind: Literal["line", "bar"] = "line",
    title: str | None = None,
    cfg: RunConfig | None = None,
) -> str:
    """Draw `metric` per run (x, in record order) and benchmark (one series each) as a PNG at `out` (a path or
    URI): a line for iterations, bars for ablations. Returns `out`."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    from synth_core.storage import get_fs

    runs = list(dict.fromkeys(r["run"] for r in records))
    benches = list(dict.fromkeys(r["benchmark"] for r in records))
    if not runs:
        raise EvalError("plot_pass_at_1: no records")
    value = {(r["run"], r["benchmark"]): r.get(metric) for r in records}
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(runs) + 2), 3.5), dpi=120)
    width = 0.8 / max(len(benches), 1)
    for j, bench in enumerate(benches):
        ys = [value.get((run, bench)) for run in runs]
        ys = [float("nan") if y is None else 100.0 * y for y in ys]
        if kind == "bar":
            xs = [i + (j - (len(benches) - 1) / 2) * width for i in range(len(runs))]
            ax.bar(xs, ys, width=width, label=bench)
        else:
            ax.plot(range(len(runs)), ys, marker="o", label=bench)
    ax.set_xticks(range(len(runs)), runs, rotation=20 if len(runs) > 4 else 0)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title or f"{metric} per run")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    fs, path = get_fs(out, cfg.storage if cfg else None)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())
    return out
