"""One tiny round (the tiny random Llama, a real Prefect API) with the random-selection ablation, the held-out
split of R and the evaluation on: its convergence records, the held-out rows kept out of training, the report
(table, PNG, artifact) next to the data card, and `scoder report` comparing runs.

The tiny random model writes nothing parsable, so the iterations and the release keep no rows: only R is
evaluated (the report lists the others as not evaluated); tests/test_random_selection.py fills a selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_round_config
from typer.testing import CliRunner

from synth_core.config import parse_config
from synth_core.convergence import heldout_rows
from synth_core.reference import builtin_reference_path, load_reference
from synth_core.storage import read_manifest
from synth_core.train import load_training_rows

pytestmark = pytest.mark.usefixtures("prefect_api")


def _round_config(tmp_path: Path) -> dict:
    # A small R (8 rows of the built-in one): the three trainings of the round then take seconds, not minutes.
    ref = tmp_path / "ref.jsonl"
    ref.write_text("".join(builtin_reference_path().read_text().splitlines(keepends=True)[:8]))
    cfg = tiny_round_config(tmp_path, "work")
    cfg["sample"]["shard_rows"] = 8
    cfg["train"]["num_checkpoints"] = 1
    cfg["sandbox"] = {"timeout_s": 5}
    cfg["evaluation"] = {
        "student": "builtin:tiny-random-llama",
        "max_problems": 2,
        "generation": {"backend": "transformers", "max_new_tokens": 16},
    }
    cfg["round"].update(random_selection=True, reference=str(ref), holdout_fraction=0.25, evaluate=True)
    cfg["round"]["probe_snippets"] = 2  # scoder report compares the runs' probes
    return cfg


def test_round_convergence_holdout_and_report(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.cli import app
    from flows.round import round_flow

    data = _round_config(tmp_path)
    cfg = parse_config(data)
    release = round_flow(config=data)
    stats = read_manifest(release).stats
    stages = {s["stage"]: s["uri"] for s in stats["stages"]}
    assert "iteration 1: random_selection" in stages and "synthesize: random_selection" in stages
    assert read_manifest(stages["iteration 1: random_selection"]).stage == "random_selection"

    # The held-out rows of R: no training saw them (bootstrap and iteration read R through the split).
    split = stats["split"]
    held = {r["ref_id"] for r in heldout_rows(split, cfg)}
    n_ref = load_reference(data["round"]["reference"]).num_rows
    assert n_ref == 8 and len(held) == 2
    for train in (stages["bootstrap"], stages["iteration 1: train"]):
        m = read_manifest(train)
        assert split in m.inputs and m.stats["train_rows"] == n_ref - len(held)
    train_refs = set(load_reference(split).column("ref_id").to_pylist())
    assert not held & train_refs
    rows, _ = load_training_rows([split], cfg)
    assert len(rows) == n_ref - len(held)

    # Convergence: one record per iteration (0 = bootstrap), survival per filter, a held-out loss each.
    conv = stats["convergence"]
    assert [r["iteration"] for r in conv] == [0, 1, "release"]  # the release's stages: no training, no loss
    assert conv[2]["heldout_loss"] is None and conv[2]["candidates"] == 2 * 1 * 2
    conv = conv[:2]
    for r in conv:
        assert r["heldout_rows"] == len(held) and 0 < r["heldout_loss"] < 50
    it1 = conv[1]
    assert it1["candidates"] == 2 * 1 * 2  # 2 snippets x 1 checkpoint x 2 samples
    assert set(it1["survival"]) == {"sample", "score", "influence", "random_selection"}
    assert it1["checkpoint"] != conv[0]["checkpoint"]
    card = (Path(release) / "README.md").read_text()
    assert "## Convergence" in card and "| bootstrap |" in card and "held-out rows of R" in card

    # The report next to the data card: R evaluated (2 problems of each default benchmark: HumanEval and the
    # shipped MBPP), the empty data listed as not evaluated.
    report = json.loads((Path(release) / "report.json").read_text())
    evals = report["evaluations"]
    assert list(evals) == ["bootstrap (R)", "iteration 1", "release"]
    assert evals["bootstrap (R)"] and evals["iteration 1"] is None and evals["release"] is None
    assert report["records"] == [
        {"run": "bootstrap (R)", "benchmark": bench, "problems": 2, "pass@1": record["pass@1"]}
        for bench, record in zip(["humaneval", "mbpp"], report["records"], strict=True)
    ]
    md = (Path(release) / "report.md").read_text()
    assert "| bootstrap (R) | humaneval | 2 |" in md and "| bootstrap (R) | mbpp | 2 |" in md
    assert "Not evaluated" in md and "pass_at_1.png" in md and "## Probe: every synthesizer" in md
    assert (Path(release) / "pass_at_1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    wanted = ["round-convergence", "round-report"]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=wanted)))
    assert {a.key for a in found} == set(wanted)

    # scoder report: runs (releases or evaluation outputs) side by side, one table and bar plot.
    out = tmp_path / "ablations"
    r = CliRunner().invoke(
        app,
        [
            "report",
            "--run",
            f"full={release}",
            "--run",
            f"direct={evals['bootstrap (R)']}",
            "--label",
            "bootstrap (R)",
            "--out",
            str(out),
            "--config",
            str(_write_yaml(tmp_path, data)),
        ],
    )
    assert r.exit_code == 0, r.output
    text = (out / "report.md").read_text()
    assert "| full | humaneval | 2 |" in text and "| direct | humaneval | 2 |" in text
    assert "Held-out loss of the last synthesizer" in text and "| full | 1 |" in text
    # The probe (2 seeds): iteration 1 kept nothing, so it has the bootstrap's weights and ties it on every seed.
    assert "## Probe: asserts passed on the same unused seeds" in text
    assert "| full | 2 | 0.0% | after iteration 1 | 0.0% | 0 / 0 / 2 |  |" in text
    assert (out / "pass_at_1.png").stat().st_size > 0
    # The release was not evaluated (no kept rows) but has a probe: listed as not evaluated, compared by its probe.
    yaml_path, x_out = str(tmp_path / "round.yaml"), str(tmp_path / "x")
    r = CliRunner().invoke(app, ["report", "--run", f"x={release}", "--out", x_out, "--config", yaml_path])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "x" / "report.md").read_text()
    assert "Not evaluated (round.evaluate was off; the probe below compares them): x." in text and "| x | 2 |" in text
    # Neither an evaluation nor a probe: one line naming the run.
    r = CliRunner().invoke(app, ["report", "--run", f"y={stats['split']}", "--config", yaml_path])
    assert r.exit_code == 2 and "no report.json" in r.output


def _write_yaml(tmp_path: Path, data: dict) -> Path:
    import yaml

    path = tmp_path / "round.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_release_is_training_data_for_the_evaluation(cfg, tmp_path):
    """The round evaluates its release: a release has no reject_reason column (all its rows are kept)."""
    from conftest import write_samples

    from synth_core.evaluate import training_data
    from synth_core.release import build_release

    candidates = [
        dict(snippet="x = 1\n", instruction="Write inc(x).", response="def inc(x):\n    return x + 1\n"),
        dict(snippet="z = 3\n", instruction="bad", response="x", reject_reason="no_code_block"),
    ]
    samples = write_samples(str(tmp_path / "samples"), candidates)
    release = build_release(cfg, samples, [("sample", samples)], str(tmp_path / "release"))
    rows, fps = load_training_rows([release], cfg)
    assert [r["instruction"] for r in rows] == ["Write inc(x)."] and fps == [read_manifest(release).fingerprint]
    assert training_data(cfg, release)[0] == [("Write inc(x).", "def inc(x):\n    return x + 1\n")]
