"""The snippet-pool flow: plan -> ingest shards -> dedup -> decontamination shards -> manifest.

Wiring only; the work is in synth_core.pool (its ingest and decontamination Stages, run by flows/stage.run_stage;
dedup through tasks/pool.py). Re-running with the same inputs and config is free (the output's manifest carries the
fingerprint), and a re-run after a crash redoes only the shards that had not written their part.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.stage import Progress, run_stage
from synth_core import pool
from synth_core.config import parse_config
from tasks import pool as pool_tasks


@flow(name="pool-build", log_prints=True)
def pool_flow(config: dict[str, Any] | None = None, out: str | None = None) -> str:
    """Build the seed-snippet pool; return the pool dataset's URI."""
    cfg = parse_config(config)
    plan = pool.plan_pool(cfg, out)
    if pool.pool_is_built(plan.targets, cfg):
        get_run_logger().info(
            "pool already built at %s (fingerprint %s): nothing to do", plan.targets.out_uri, plan.targets.pool_fp
        )
        return plan.targets.out_uri
    progress = Progress("pool-progress", "ingest", 0, len(plan.shards) + 1)
    ingest = run_stage(pool.INGEST, plan, cfg, progress=progress)
    decontam = pool_tasks.dedup(plan, ingest.results, ingest.wall_s, cfg)
    progress.done_before, progress.total = len(plan.shards), len(plan.shards) + len(decontam.parts)
    return run_stage(pool.DECONTAMINATE, decontam, cfg, progress=progress).out_uri
