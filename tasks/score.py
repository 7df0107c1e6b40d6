"""Prefect tasks of the score stage: one task run per shard of candidates (whole seed snippets).

Thin wrappers over synth_core.score. Each shard runs its judge engine in a spawned subprocess and its code in the
sandbox (synth_core.sandbox). Idempotency lives in synth_core (a finished shard's marker carries the stage
fingerprint), so no Prefect result cache is used. Retries cover transient failures (storage, an engine that
died); a deterministic failure fails the task with its error in the Prefect UI, and a re-run redoes only the
unfinished shards.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from synth_core import score
from synth_core.config import RunConfig
from synth_core.storage import ShardResult
from tasks.retry import RETRY


@task(
    name="score-shard",
    task_run_name="score-shard-{index}",
    **RETRY,
    cache_policy=NO_CACHE,
    tags=["gpu"],
)
def score_shard(plan: score.ScorePlan, shard: score.ScoreShard, index: int, cfg: RunConfig) -> ShardResult:
    """Execute, judge, score and select one shard of candidates."""
    return score.score_shard(plan, shard, index, cfg)
