"""synth_core.stage: the in-process runner calls a Stage's steps in order, skips a done stage, and a real stage
(the pool's) runs the same under it as its own build."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from synth_core.stage import StageRun, run_stage_local
from synth_core.storage import (
    ShardResult,
    commit_dataset,
    compute_funnel,
    dataset_has_fingerprint,
    hide_stale_dataset,
    merge_funnels,
    read_dataset,
    write_part,
)

SCHEMA = pa.schema([pa.field("x", pa.int64()), pa.field("reject_reason", pa.string())])


@dataclass
class Plan:
    out: str
    fp: str
    shards: list[list[int]]
    calls: list[str] = field(default_factory=list)


class Doubles:
    """A tiny real stage: each shard writes its numbers doubled, odd ones rejected."""

    name = "doubles"

    def out_uri(self, plan):
        return plan.out

    def fingerprint(self, plan):
        return plan.fp

    def done(self, plan, cfg):
        plan.calls.append("done")
        return dataset_has_fingerprint(plan.out, plan.fp)

    def prepare(self, plan, cfg):
        plan.calls.append("prepare")
        hide_stale_dataset(plan.out, plan.fp)

    def shards(self, plan):
        return plan.shards

    def window(self, cfg):
        return None

    def run_shard(self, plan, shard, index, cfg):
        plan.calls.append(f"shard-{index}")
        xs = [2 * x for x in shard]
        t = pa.Table.from_pydict({"x": xs, "reject_reason": [None if x % 4 == 0 else "odd" for x in xs]}, SCHEMA)
        return ShardResult(write_part(plan.out, index, t, plan.fp, compute_funnel(t)), 0.0)

    def commit(self, plan, results, cfg, elapsed_s):
        plan.calls.append("commit")
        funnel = merge_funnels([r.funnel for r in results])
        return commit_dataset(plan.out, [r.part for r in results], SCHEMA, plan.fp, stage="doubles", funnel=funnel)

    def describe(self, plan, cfg):
        return "doubles"

    def summary(self, plan, manifest):
        return "done"

    def artifacts(self, plan, manifest, cfg):
        return []


def test_run_stage_local_runs_the_steps_in_order_and_a_done_stage_is_free(tmp_path):
    plan = Plan(str(tmp_path / "d"), "fp1", [[1, 2], [3]])
    run = run_stage_local(Doubles(), plan, None)
    assert isinstance(run, StageRun) and not run.was_done and run.out_uri == plan.out
    assert plan.calls == ["done", "prepare", "shard-0", "shard-1", "commit"]
    assert read_dataset(plan.out).column("x").to_pylist() == [2, 4, 6]
    assert run.manifest.funnel == {"rows_in": 3, "kept": 1, "rejected": {"odd": 2}}
    again = Plan(plan.out, "fp1", plan.shards)
    assert run_stage_local(Doubles(), again, None).was_done and again.calls == ["done"]


def test_the_pool_build_is_its_two_stages(tmp_path, cfg, source_tree):
    from synth_core import pool
    from synth_core.storage import read_manifest

    cfg.pool.sources = [str(source_tree)]
    uri = pool.build_pool(cfg, str(tmp_path / "pool"))
    steps = [s["step"] for s in read_manifest(uri).stats["steps"]]
    assert steps == ["ingest", "dedup", "decontaminate", "total"]
    assert read_manifest(uri).fingerprint == pool.plan_pool(cfg, uri).targets.pool_fp
