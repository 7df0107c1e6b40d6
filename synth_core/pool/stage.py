"""The pool's Stages: INGEST (one shard of source units per task) and DECONTAMINATE (one dedup part per task, then
the pool's manifest), with steps.dedup_and_plan between them; build_pool runs all of it in this process.

What it leaves to others: the work of each step (steps.py), the executors (synth_core.stage.run_stage_local here,
flows/stage.run_stage under Prefect).
"""

from __future__ import annotations

from synth_core.config import RunConfig
from synth_core.pool.plan import DecontamPlan, PoolPlan, plan_pool
from synth_core.pool.sources import SourceUnit
from synth_core.pool.steps import (
    commit_ingest,
    commit_pool,
    decontaminate_shard,
    dedup_and_plan,
    ingest_shard,
    pool_is_built,
    prepare_output,
)
from synth_core.stage import StageArtifact, funnel_artifact, run_stage_local
from synth_core.storage import Manifest, PartInfo, ShardResult, peak_rss_mb, step_stats


class IngestStage:
    """The pool's ingest step as a synth_core.stage.Stage: one shard of source units per task.

    Never `done` on its own: the pool's build checks the pool first (pool_is_built); past that, every shard runs
    (a finished one returns at once from its marker, and the step's stats count it cached) and the ingest manifest
    is written again, as the build always did."""

    name = "ingest"

    def out_uri(self, plan: PoolPlan) -> str:
        return plan.targets.ingest_uri

    def fingerprint(self, plan: PoolPlan) -> str:
        return plan.targets.ingest_fp

    def done(self, plan: PoolPlan, cfg: RunConfig) -> bool:
        return False

    def prepare(self, plan: PoolPlan, cfg: RunConfig) -> None:
        pass  # the ingest location is its fingerprint's own: nothing stale can be there

    def shards(self, plan: PoolPlan) -> list[list[SourceUnit]]:
        return plan.shards

    def window(self, cfg: RunConfig) -> int | None:
        return None

    def run_shard(self, plan: PoolPlan, shard: list[SourceUnit], index: int, cfg: RunConfig) -> ShardResult:
        return ingest_shard(shard, index, plan.targets, cfg)

    def commit(self, plan: PoolPlan, results: list[ShardResult], cfg: RunConfig, elapsed_s: float) -> Manifest:
        return commit_ingest(plan.targets, results, cfg)

    def describe(self, plan: PoolPlan, cfg: RunConfig) -> str:
        t = plan.targets
        return f"pool {t.pool_fp}: {len(plan.shards)} ingest shards from {', '.join(t.sources)}"

    def summary(self, plan: PoolPlan, manifest: Manifest) -> str:
        return f"ingested into {plan.targets.ingest_uri}: {manifest.num_rows} rows, {manifest.kept_rows} kept"

    def artifacts(self, plan: PoolPlan, manifest: Manifest, cfg: RunConfig) -> list[StageArtifact]:
        return []


class DecontamStage:
    """The pool's decontamination step as a synth_core.stage.Stage: one dedup part per task, then the pool's
    manifest (the whole funnel, every step's throughput)."""

    name = "decontaminate"

    def out_uri(self, plan: DecontamPlan) -> str:
        return plan.targets.out_uri

    def fingerprint(self, plan: DecontamPlan) -> str:
        return plan.targets.pool_fp

    def done(self, plan: DecontamPlan, cfg: RunConfig) -> bool:
        return pool_is_built(plan.targets, cfg)

    def prepare(self, plan: DecontamPlan, cfg: RunConfig) -> None:
        prepare_output(plan.targets, cfg)

    def shards(self, plan: DecontamPlan) -> list[PartInfo]:
        return plan.parts

    def window(self, cfg: RunConfig) -> int | None:
        return None

    def run_shard(self, plan: DecontamPlan, shard: PartInfo, index: int, cfg: RunConfig) -> ShardResult:
        return decontaminate_shard(plan.targets, shard, index, cfg)

    def commit(self, plan: DecontamPlan, results: list[ShardResult], cfg: RunConfig, elapsed_s: float) -> Manifest:
        steps = [*plan.steps, step_stats("decontaminate", results, elapsed_s)]
        # The build's wall time: its steps' (planning left out).
        total = {
            "step": "total",
            "rows": sum(r.rows for r in results),
            "wall_s": round(sum(s["wall_s"] for s in steps), 3),
        }
        return commit_pool(
            plan.targets, results, cfg, {"steps": [*steps, total], "peak_rss_mb": round(peak_rss_mb(), 1)}
        )

    def describe(self, plan: DecontamPlan, cfg: RunConfig) -> str:
        return f"pool {plan.targets.pool_fp}: decontaminating {len(plan.parts)} shards"

    def summary(self, plan: DecontamPlan, manifest: Manifest) -> str:
        return f"pool written to {plan.targets.out_uri}: {manifest.num_rows} rows, {manifest.funnel['kept']} kept"

    def artifacts(self, plan: DecontamPlan, manifest: Manifest, cfg: RunConfig) -> list[StageArtifact]:
        return [funnel_artifact("pool-funnel", "Pool", manifest, plan.targets.out_uri)]


INGEST = IngestStage()
DECONTAMINATE = DecontamStage()


def build_pool(cfg: RunConfig, out: str | None = None) -> str:
    """Build the pool in this process, step after step (no orchestrator); return its URI."""
    plan = plan_pool(cfg, out)
    if pool_is_built(plan.targets, cfg):
        return plan.targets.out_uri
    ingest = run_stage_local(INGEST, plan, cfg)
    return run_stage_local(DECONTAMINATE, dedup_and_plan(plan, ingest.results, ingest.wall_s, cfg), cfg).out_uri
