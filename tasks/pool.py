"""Prefect tasks of the snippet-pool flow: one task run per ingest shard and per decontamination shard.

Thin wrappers over synth_core.pool. Idempotency lives in synth_core (a shard whose part marker
exists returns at once), so these tasks need no Prefect result cache: a cache would claim "done"
even after someone deleted the data. Retries cover transient storage errors.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from synth_core import pool
from synth_core.config import RunConfig
from synth_core.storage import PartInfo
from tasks.retry import RETRY


@task(
    name="pool-ingest-shard",
    task_run_name="ingest-shard-{index}",
    **RETRY,
    cache_policy=NO_CACHE,
)
def ingest_shard(
    units: list[pool.SourceUnit], index: int, targets: pool.PoolTargets, cfg: RunConfig
) -> pool.ShardResult:
    """Read, filter and cut one shard of source files; write its part with MinHash signatures."""
    return pool.ingest_shard(units, index, targets, cfg)


@task(name="pool-commit-ingest", cache_policy=NO_CACHE)
def commit_ingest(targets: pool.PoolTargets, results: list[pool.ShardResult], cfg: RunConfig) -> str:
    pool.commit_ingest(targets, results, cfg)
    return targets.ingest_uri


@task(name="pool-dedup", **RETRY, cache_policy=NO_CACHE)
def dedup(targets: pool.PoolTargets, cfg: RunConfig) -> list[PartInfo]:
    """Global exact + near dedup (needs every signature, so one task); returns the re-partitioned parts."""
    return pool.dedup_pool(targets, cfg)


@task(
    name="pool-decontaminate-shard",
    task_run_name="decontaminate-shard-{index}",
    **RETRY,
    cache_policy=NO_CACHE,
)
def decontaminate_shard(targets: pool.PoolTargets, part: PartInfo, index: int, cfg: RunConfig) -> pool.ShardResult:
    """Match one shard's kept snippets against the benchmarks; write the pool's part."""
    return pool.decontaminate_shard(targets, part, index, cfg)
