"""The pool flow against a real Prefect API: shard tasks, artifacts, free re-runs, s3:// output."""

from __future__ import annotations

import pytest
from conftest import task_runs_of
from prefect.client.orchestration import get_client

from synth_core.storage import read_dataset, read_manifest

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_flow_builds_the_pool_with_one_task_per_shard(tmp_path, cfg, source_tree):
    from flows.pool import pool_flow

    for i in range(5):
        (source_tree / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i} * {i}\n\n\nVALUE_{i} = f{i}(3)\n")
    cfg.pool.sources = [str(source_tree)]
    cfg.pool.shard_files = 2
    out = str(tmp_path / "pool")
    state = pool_flow(config=cfg.model_dump(mode="json"), out=out, return_state=True)
    assert state.is_completed()
    assert state.result() == out
    names = sorted(t.name for t in task_runs_of(state.state_details.flow_run_id))
    assert [n for n in names if n.startswith("ingest-shard-")] == [f"ingest-shard-{i}" for i in range(3)]
    assert "decontaminate-shard-0" in names
    m = read_manifest(out)
    assert m.funnel["rows_in"] == m.num_rows == read_dataset(out).num_rows
    assert [s["step"] for s in m.stats["steps"]] == ["ingest", "dedup", "decontaminate", "total"]
    with get_client(sync_client=True) as client:
        assert client.read_artifacts(), "funnel/progress artifacts were not created"

    # Same inputs, same config: the re-run finds the manifest and runs no task.
    again = pool_flow(config=cfg.model_dump(mode="json"), out=out, return_state=True)
    assert again.result() == out and read_manifest(out).created_at == m.created_at
    assert task_runs_of(again.state_details.flow_run_id) == []


def test_resume_redoes_only_missing_shards(tmp_path, cfg, source_tree):
    from flows.pool import pool_flow
    from synth_core import pool

    for i in range(4):
        (source_tree / f"m{i}.py").write_text(f"def f{i}(x):\n    return x - {i}\n")
    cfg.pool.sources = [str(source_tree)]
    cfg.pool.shard_files = 2
    plan = pool.plan_pool(cfg, str(tmp_path / "pool"))
    # A crashed run: shard 0 finished, the rest did not.
    done = pool.ingest_shard(plan.shards[0], 0, plan.targets, cfg)
    state = pool_flow(config=cfg.model_dump(mode="json"), out=str(tmp_path / "pool"), return_state=True)
    steps = read_manifest(state.result()).stats["steps"]
    assert steps[0]["cached_shards"] == 1 and steps[0]["shards"] == len(plan.shards)
    assert done.rows > 0


def test_flow_writes_to_s3(cfg, source_tree, s3_endpoint):
    from flows.pool import pool_flow

    cfg.pool.sources = [str(source_tree)]
    cfg.storage.root = "s3://scoder/work"
    cfg.storage.endpoint_url = s3_endpoint
    out = "s3://scoder/pools/demo"
    assert pool_flow(config=cfg.model_dump(mode="json"), out=out) == out
    kept = read_dataset(out, kept_only=True, storage=cfg.storage)
    assert kept.num_rows > 0 and set(kept.column("reject_reason").to_pylist()) == {None}
