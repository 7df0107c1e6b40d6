"""The score flow against a real Prefect API and a real S3 server: one task per shard, artifacts, free re-runs."""

from __future__ import annotations

import pytest
from conftest import task_runs_of, write_samples
from prefect.client.orchestration import get_client

from synth_core.config import AspectConfig
from synth_core.storage import read_dataset, read_manifest

pytestmark = pytest.mark.usefixtures("prefect_api")

CODE = "```python\ndef inc(x):\n    return x + 1\n\nassert inc(1) == 2\n```"


def test_score_flow_on_s3_one_task_per_shard(cfg, tiny_model, s3_endpoint):
    from flows.score import score_flow

    cfg.storage.root = "s3://scoder/work"
    cfg.storage.endpoint_url = s3_endpoint
    candidates = [
        dict(snippet=f"y = x + {i % 3}\n", instruction=f"Write inc(x) returning x + 1, variant {i}.", response=CODE)
        for i in range(6)
    ]
    samples = write_samples("s3://scoder/samples/score-test", candidates, storage=cfg.storage)
    cfg.score.judge = tiny_model
    cfg.score.engine.backend = "transformers"
    cfg.score.aspects = [
        AspectConfig(name="quality", question="How clear is the problem?", weight=0.5),
        AspectConfig(name="asserts", kind="asserts", weight=0.5),
    ]
    cfg.score.shard_rows = 2  # 3 seeds of 2 candidates: 3 shards
    state = score_flow(samples=samples, config=cfg.model_dump(mode="json"), return_state=True)
    assert state.is_completed()
    out = state.result()
    assert out.startswith("s3://scoder/work/scored/")
    names = sorted(t.name for t in task_runs_of(state.state_details.flow_run_id))
    assert names == ["score-commit", "score-shard-0", "score-shard-1", "score-shard-2"]  # the commit is a task
    rows = read_dataset(out, storage=cfg.storage).to_pylist()
    assert len(rows) == 6 and all(r["exec_status"] == "passed" for r in rows)
    m = read_manifest(out, cfg.storage)
    assert m.funnel["kept"] == 3 and m.funnel["rejected"] == {"not_best_of_seed": 3}
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"score-funnel", "score-histogram", "score-progress"} <= keys

    again = score_flow(samples=samples, config=cfg.model_dump(mode="json"), return_state=True)
    assert again.result() == out and task_runs_of(again.state_details.flow_run_id) == []
