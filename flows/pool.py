"""The snippet-pool flow: plan -> ingest shards -> dedup -> decontamination shards -> manifest.

Wiring only; the work is in synth_core.pool through tasks/pool.py. Re-running with the same inputs
and config is free (the output's manifest carries the fingerprint), and a re-run after a crash
redoes only the shards that had not written their part.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact

from flows.runtime import run_shards
from synth_core import pool
from synth_core.config import parse_config
from synth_core.report import funnel_markdown
from tasks import pool as pool_tasks


@flow(name="pool-build", log_prints=True)
def pool_flow(config: dict[str, Any] | None = None, out: str | None = None) -> str:
    """Build the seed-snippet pool; return the pool dataset's URI."""
    logger = get_run_logger()
    cfg = parse_config(config)
    t0 = time.perf_counter()
    plan = pool.plan_pool(cfg, out)
    targets = plan.targets
    logger.info("pool %s: %d ingest shards from %s", targets.pool_fp, len(plan.shards), ", ".join(targets.sources))
    if pool.pool_is_built(targets, cfg):
        logger.info("pool already built at %s (fingerprint %s): nothing to do", targets.out_uri, targets.pool_fp)
        return targets.out_uri
    total = len(plan.shards) + 1
    progress = create_progress_artifact(progress=0.0, key="pool-progress", description="ingest")

    t = time.perf_counter()
    submits = [partial(pool_tasks.ingest_shard.submit, units, i, targets, cfg) for i, units in enumerate(plan.shards)]
    ingest = run_shards(submits, "ingest", progress, 0, total)
    pool_tasks.commit_ingest(targets, ingest, cfg)
    steps = [pool.step_stats("ingest", ingest, time.perf_counter() - t)]

    t = time.perf_counter()
    parts = pool_tasks.dedup(targets, cfg)
    steps.append(pool.dedup_step_stats(parts, time.perf_counter() - t))
    total = len(plan.shards) + len(parts)

    t = time.perf_counter()
    pool.prepare_output(targets, cfg)
    submits = [partial(pool_tasks.decontaminate_shard.submit, targets, p, i, cfg) for i, p in enumerate(parts)]
    results = run_shards(submits, "decontaminate", progress, len(plan.shards), total)
    steps.append(pool.step_stats("decontaminate", results, time.perf_counter() - t))
    steps.append({"step": "total", "rows": sum(r.rows for r in results), "wall_s": round(time.perf_counter() - t0, 3)})

    manifest = pool.commit_pool(targets, results, cfg, {"steps": steps, "peak_rss_mb": round(pool.peak_rss_mb(), 1)})
    create_table_artifact(
        key="pool-funnel", table=funnel_markdown(manifest.funnel), description=f"Pool funnel: {targets.out_uri}"
    )
    logger.info("pool written to %s: %d rows, %d kept", targets.out_uri, manifest.num_rows, manifest.funnel["kept"])
    return targets.out_uri
