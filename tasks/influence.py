"""Prefect tasks of the influence stage: R's features once per checkpoint, then one task run per shard of candidates.

Thin wrappers over synth_core.influence. Each gradient pass runs in a spawned subprocess (synth_core.procs), so a
model's memory is freed when it returns. Idempotency lives in synth_core (the target datasets and the shards'
markers carry the stage fingerprint), so no Prefect result cache is used. Retries cover transient failures
(storage, a process that died); an InfluenceError fails the task with its message in the Prefect UI.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from synth_core import influence
from synth_core.config import RunConfig
from synth_core.storage import ShardResult
from tasks.retry import RETRY


@task(
    name="influence-targets",
    task_run_name="influence-targets-ckpt-{checkpoint}",
    **RETRY,
    cache_policy=NO_CACHE,
    tags=["gpu"],
)
def target_features(plan: influence.InfluencePlan, checkpoint: int, cfg: RunConfig) -> str:
    """Gradient features of the reference set R at one checkpoint; returns their dataset's URI."""
    return influence.target_features(plan, checkpoint, cfg)


@task(
    name="influence-shard",
    task_run_name="influence-shard-{index}",
    **RETRY,
    cache_policy=NO_CACHE,
    tags=["gpu"],
)
def influence_shard(
    plan: influence.InfluencePlan, shard: influence.InfluenceShard, index: int, cfg: RunConfig
) -> ShardResult:
    """Gradient features of one shard of candidates at every checkpoint, and their influence."""
    return influence.influence_shard(plan, shard, index, cfg)
