"""Prefect task of the snippet-pool flow besides its sharded steps (tasks/stage.py): the global dedup.

A thin wrapper over synth_core.pool. Idempotency lives in synth_core (the dedup dataset's manifest carries its
fingerprint), so no Prefect result cache is used: a cache would claim "done" even after someone deleted the data.
Retries cover transient storage errors.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from synth_core import pool
from synth_core.config import RunConfig
from synth_core.storage import ShardResult
from tasks.retry import RETRY


@task(name="pool-dedup", **RETRY, cache_policy=NO_CACHE)
def dedup(plan: pool.PoolPlan, ingest: list[ShardResult], ingest_wall_s: float, cfg: RunConfig) -> pool.DecontamPlan:
    """Global exact + near dedup (needs every signature, so one task); returns the decontamination's plan."""
    return pool.dedup_and_plan(plan, ingest, ingest_wall_s, cfg)
