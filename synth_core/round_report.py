"""A round's report: pass@1 (and pass@k) of a student fine-tuned on each iteration's data, or on each ablation's
release, as a markdown table and a PNG plot (issue 8).

- `write_report`: from evaluation outputs named by label (`R`, `iteration 1`, ..., `release`), write `report.md`
  (the table of synth_core.evaluate.comparison_records, the plot, where each evaluation is), `pass_at_1.png`
  (synth_core.evaluate.plot_pass_at_1) and `report.json` (the labels' evaluation URIs and the records) into a
  folder: the round flow writes them next to the release's data card.
- `compare_rounds`: one table + plot over several rounds (one per ablation flag), from each release's report.json
  (its `release` evaluation, or another label's) or from evaluation outputs given directly: `scoder report`.

A label whose data had no kept rows has no evaluation (None): the report lists it as not evaluated. Knows nothing
of Prefect; the evaluations themselves are made by the evaluation flow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from synth_core.config import RunConfig
from synth_core.errors import ScoderError

REPORT_MD = "report.md"
REPORT_PNG = "pass_at_1.png"
REPORT_JSON = "report.json"


class ReportError(ScoderError, ValueError):
    """A run given to the report has no evaluation to show; the message names it."""


def _write_text(uri: str, text: str, cfg: RunConfig) -> None:
    from synth_core.storage import get_fs

    fs, path = get_fs(uri, cfg.storage)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(text)


def write_report(
    evals: Mapping[str, str | None],
    folder: str,
    cfg: RunConfig,
    title: str = "Round report",
    kind: Literal["line", "bar"] = "line",
    notes: str = "",
    why_not_evaluated: str = "no kept rows to train on",
) -> str:
    """report.md, pass_at_1.png and report.json in `folder`; returns the report's markdown.

    `evals`: label -> evaluation output URI (synth_core.evaluate), or None for data that was not evaluated."""
    from synth_core.evaluate import comparison_records, plot_pass_at_1, records_markdown
    from synth_core.storage import join_uri

    done = {label: uri for label, uri in evals.items() if uri}
    records = comparison_records(done, cfg)
    md = f"# {title}\n\n"
    md += "pass@1 (greedy) of the student fine-tuned on each run's data (`evaluation` section of the config).\n\n"
    md += (records_markdown(records) or "No evaluation.") + "\n"
    skipped = [label for label, uri in evals.items() if not uri]
    if skipped:
        md += f"\nNot evaluated ({why_not_evaluated}): {', '.join(skipped)}.\n"
    if records:
        plot_pass_at_1(records, join_uri(folder, REPORT_PNG), kind=kind, title=title, cfg=cfg)
        md += f"\n![pass@1 per run]({REPORT_PNG})\n"
    md += notes
    md += "\n## Evaluations\n\n" + "\n".join(f"- {label}: `{uri or 'not evaluated'}`" for label, uri in evals.items())
    md += "\n"
    _write_text(join_uri(folder, REPORT_MD), md, cfg)
    data = {"title": title, "evaluations": dict(evals), "records": records}
    _write_text(join_uri(folder, REPORT_JSON), json.dumps(data, indent=2), cfg)
    return md


def read_report(folder: str, cfg: RunConfig) -> dict[str, Any]:
    """The report.json of a folder (a release evaluated by its round)."""
    from synth_core.storage import get_fs, join_uri

    fs, path = get_fs(join_uri(folder, REPORT_JSON), cfg.storage)
    if not fs.exists(path):
        raise ReportError(f"{folder}: no {REPORT_JSON} (run the round with round.evaluate: true)")
    with fs.open(path, "r") as f:
        return json.loads(f.read())


def evaluation_of(uri: str, cfg: RunConfig, label: str = "release") -> str:
    """The evaluation output to compare for `uri`: itself when it is one, else the `label` evaluation of the
    report.json next to it (a release evaluated by its round)."""
    from synth_core.storage import dataset_exists, read_manifest

    if dataset_exists(uri, cfg.storage) and read_manifest(uri, cfg.storage).stage == "eval":
        return uri
    evals = read_report(uri, cfg).get("evaluations", {})
    found = evals.get(label)
    if not found:
        have = ", ".join(k for k, v in evals.items() if v) or "none"
        raise ReportError(f"{uri}: its report has no evaluation '{label}' (evaluated: {have})")
    return found


def compare_rounds(
    runs: Mapping[str, str], out: str, cfg: RunConfig, label: str = "release", title: str = "Ablations"
) -> str:
    """One report over several rounds (label -> a release evaluated by its round, or an evaluation output), bars
    per run; plus each release's last held-out loss when its manifest has convergence records, and its probe
    (probe_comparison). A run without the evaluation but with a probe (an ablation run with round.evaluate off) is
    listed as not evaluated. Returns the markdown (also written to `out`/report.md with the PNG and JSON)."""
    stats = {name: release_stats(uri, cfg) for name, uri in runs.items()}
    evals: dict[str, str | None] = {}
    for name, uri in runs.items():
        try:
            evals[name] = evaluation_of(uri, cfg, label)
        except ReportError:
            # An ablation run with round.evaluate off still compares by its probe; a run with neither is an error.
            if not stats[name].get("probe"):
                raise
            evals[name] = None
    losses = []
    for name in runs:
        trained = [r for r in stats[name].get("convergence") or [] if r.get("heldout_loss") is not None]
        if trained:  # (not the release's record)
            losses.append(f"| {name} | {trained[-1]['iteration']} | {_fmt(trained[-1]['heldout_loss'])} |")
    notes = ""
    if losses:
        notes = "\n## Held-out loss of the last synthesizer\n\n| run | iteration | held-out loss |\n|---|---:|---:|\n"
        notes += "\n".join(losses) + "\n"
    notes += probe_comparison({name: s.get("probe") for name, s in stats.items()})
    why = "round.evaluate was off; the probe below compares them"
    return write_report(evals, out, cfg, title=title, kind="bar", notes=notes, why_not_evaluated=why)


def release_stats(uri: str, cfg: RunConfig) -> dict[str, Any]:
    """The manifest stats of a dataset (a release: its convergence records, its probe), or {} where there is none
    (an evaluation output's folder, say)."""
    from synth_core.storage import dataset_exists, read_manifest

    return read_manifest(uri, cfg.storage).stats if dataset_exists(uri, cfg.storage) else {}


def probe_comparison(probes: Mapping[str, dict[str, Any] | None]) -> str:
    """Per run (name -> the probe its release records, round.probe_snippets, or None): its bootstrap's and its last
    synthesizer's share of answers that passed their own asserts on the probe's seeds. Runs of one config and pool
    probe the same seeds (the window after the release's), so their last synthesizers compare across ablations."""
    from synth_core.convergence import p_cell, pct_cell

    lines = []
    for name, probe in probes.items():
        if not probe:
            continue
        recs = {r["synthesizer"]: r for r in probe["records"]}
        first, last = recs.get("bootstrap"), probe["records"][-1]
        vs = last.get("vs") or {}
        p = p_cell(vs.get("p"))
        start = pct_cell(first["assert_pass_rate"] if first else None)
        lines.append(
            f"| {name} | {probe['seeds']} | {start} | {last['synthesizer']} | "
            f"{pct_cell(last['assert_pass_rate'])} | {vs.get('gained', '')} / {vs.get('lost', '')} / "
            f"{vs.get('tied', '')} | {p} |"
        )
    if not lines:
        return ""
    head = (
        "\n## Probe: asserts passed on the same unused seeds\n\n| run | seeds | bootstrap | last synthesizer | "
        "asserts passed | seeds gained / lost / tied | p |\n|---|---:|---:|---|---:|---|---:|\n"
    )
    return head + "\n".join(lines) + "\n"


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"
