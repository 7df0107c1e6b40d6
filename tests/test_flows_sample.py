"""The sample flow against a real Prefect API and a real S3 server: one task per shard, artifacts, free
re-runs, and the CLI's clear errors."""

from __future__ import annotations

import pytest
from conftest import SNIPPETS, task_runs_of, write_pool
from prefect.client.orchestration import get_client
from typer.testing import CliRunner

from synth_core.storage import read_dataset, read_manifest

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_sample_flow_on_s3_one_task_per_shard(cfg, tiny_loras, s3_endpoint):
    from flows.sample import sample_flow

    cfg.storage.root = "s3://scoder/work"
    cfg.storage.endpoint_url = s3_endpoint
    pool = write_pool("s3://scoder/pools/sample-test", SNIPPETS, storage=cfg.storage)
    cfg.sample.checkpoints = list(tiny_loras)
    cfg.sample.generation.backend = "transformers"
    cfg.sample.generation.max_new_tokens = 8
    cfg.sample.shard_rows = 2
    state = sample_flow(snippets=pool, config=cfg.model_dump(mode="json"), return_state=True)
    assert state.is_completed()
    out = state.result()
    assert out.startswith("s3://scoder/work/samples/")
    names = sorted(t.name for t in task_runs_of(state.state_details.flow_run_id))
    assert names == ["sample-commit", "sample-shard-0", "sample-shard-1"]  # the commit is a retried task
    m = read_manifest(out, cfg.storage)
    assert m.num_rows == read_dataset(out, storage=cfg.storage).num_rows == 4 * 2 * 2
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"sample-funnel", "sample-progress"} <= keys

    again = sample_flow(snippets=pool, config=cfg.model_dump(mode="json"), return_state=True)
    assert again.result() == out and task_runs_of(again.state_details.flow_run_id) == []


def test_cli_sample_errors_are_one_line(tmp_path, snippet_pool):
    from flows.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["sample", "--snippets", snippet_pool, "--checkpoint", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "error: model" in r.output and "not found" in r.output
    r = runner.invoke(app, ["sample", "--snippets", str(tmp_path / "no-pool")])
    assert r.exit_code == 2 and "no dataset at" in r.output
    r = runner.invoke(app, ["sample", "--snippets", snippet_pool, "--set", "sample.genration.seed=1"])
    assert r.exit_code == 2 and "unknown key 'sample.genration'" in r.output
