"""Prefect tasks of the sample stage: one task run per shard of seed snippets.

Thin wrappers over synth_core.sample. Each shard task starts its own engine in a spawned subprocess
(synth_core.procs), so its memory is freed when the task ends. Idempotency lives in synth_core (a
finished shard's marker carries the stage fingerprint), so no Prefect result cache is used.
Retries cover transient failures (storage, an engine that died); a deterministic failure fails the
task with its error in the Prefect UI, and a re-run redoes only the unfinished shards.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from synth_core import sample
from synth_core.config import RunConfig
from synth_core.storage import ShardResult
from tasks.retry import RETRY


@task(
    name="sample-shard",
    task_run_name="sample-shard-{index}",
    **RETRY,
    cache_policy=NO_CACHE,
    tags=["gpu"],
)
def sample_shard(plan: sample.SamplePlan, shard: sample.SampleShard, index: int, cfg: RunConfig) -> ShardResult:
    """Generate, parse and write one shard of samples (every checkpoint, N completions per snippet)."""
    return sample.sample_shard(plan, shard, index, cfg)
