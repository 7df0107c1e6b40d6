"""The influence flow against a real Prefect API: R's features once per checkpoint, one task per candidate shard,
the funnel and histogram artifacts, a free re-run; and the CLI's one-line errors."""

from __future__ import annotations

import pytest
from conftest import task_runs_of
from prefect.client.orchestration import get_client
from test_influence import STAGE_PAIRS, reference_file, stage_cfg, trained_ckpts, write_candidates  # noqa: F401
from typer.testing import CliRunner

from synth_core.storage import read_dataset, read_manifest

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_influence_flow_targets_once_then_one_task_per_shard(cfg, tmp_path, trained_ckpts, reference_file):  # noqa: F811
    from flows.influence import influence_flow

    stage_cfg(cfg)
    cfg.influence.shard_rows = 2
    cands = write_candidates(str(tmp_path / "cands"), STAGE_PAIRS[:4], rejected={1})
    params = dict(candidates=cands, checkpoints=trained_ckpts[-1:], reference=reference_file)
    state = influence_flow(**params, config=cfg.model_dump(mode="json"), return_state=True)
    assert state.is_completed()
    out = state.result()
    names = sorted(t.name for t in task_runs_of(state.state_details.flow_run_id))
    assert names == ["influence-commit", "influence-shard-0", "influence-shard-1", "influence-targets-ckpt-0"]
    table = read_dataset(out, storage=cfg.storage)
    assert table.num_rows == 4 and table.column("reject_reason").to_pylist().count(None) == 2  # ceil(0.5 x 3)
    assert read_manifest(out, cfg.storage).stats["scored"] == 3
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts()}
    assert {"influence-funnel", "influence-histogram", "influence-progress"} <= artifacts.keys()
    histogram = artifacts["influence-histogram"].data
    assert histogram.startswith("| influence | rows | kept |") and histogram.count("\n") == 11  # 10 bins

    again = influence_flow(**params, config=cfg.model_dump(mode="json"), return_state=True)
    assert again.result() == out and task_runs_of(again.state_details.flow_run_id) == []


def test_cli_influence_errors_are_one_line(tmp_path, tiny_loras, reference_file):  # noqa: F811
    from flows.cli import app

    cands = write_candidates(str(tmp_path / "cands"), STAGE_PAIRS[:2])
    runner = CliRunner()
    base = ["influence", "--candidates", cands, "--reference", reference_file]
    r = runner.invoke(app, [*base, "--checkpoint", tiny_loras[0]])
    assert r.exit_code == 2 and r.output.startswith("error: checkpoint") and "no optimiser state" in r.output
    assert r.output.count("\n") == 1
    r = runner.invoke(app, [*base, "--checkpoint", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "error: model" in r.output and "not found" in r.output
    r = runner.invoke(
        app,
        [
            "influence",
            "--candidates",
            str(tmp_path / "none"),
            "-k",
            tiny_loras[0],
            "--set",
            "influence.require_optimizer_state=false",
        ],
    )
    assert r.exit_code == 2 and "no dataset at" in r.output
    r = runner.invoke(app, [*base, "-k", tiny_loras[0], "--set", "influence.proj_dm=8"])
    assert r.exit_code == 2 and "unknown key 'influence.proj_dm'" in r.output
    allow = ["--set", "influence.require_optimizer_state=false"]
    r = runner.invoke(app, ["influence", "--candidates", cands, "-k", tiny_loras[0], "-r", "missing.jsonl", *allow])
    assert r.exit_code == 2 and r.output == "error: missing.jsonl: no such reference file\n"
