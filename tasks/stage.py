"""The Prefect tasks of every sharded stage (synth_core.stage.Stage): one task run per shard, one for the commit.

Two generic tasks, retried like every task (tasks/retry.py), and the names, run names and tags each stage's tasks
show in the Prefect UI (`TASK_OPTIONS`; a `gpu` tag lets a work pool route engine-heavy shards). Idempotency lives
in synth_core (a finished shard's marker, the manifest's fingerprint), so no Prefect result cache is used: a
cache would claim "done" even after someone deleted the data. The commit is a task so that a storage hiccup while
writing the manifest is retried instead of failing the flow after every shard succeeded.
"""

from __future__ import annotations

from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE

from synth_core.config import RunConfig
from synth_core.stage import Stage
from synth_core.storage import Manifest, ShardResult
from tasks.retry import RETRY

# Per stage name: (shard task name, shard task-run name, commit task name, tags). The shard names are the ones
# the UI and the flow tests have always shown.
TASK_OPTIONS: dict[str, tuple[str, str, str, list[str]]] = {
    "sample": ("sample-shard", "sample-shard-{index}", "sample-commit", ["gpu"]),
    "score": ("score-shard", "score-shard-{index}", "score-commit", ["gpu"]),
    "ingest": ("pool-ingest-shard", "ingest-shard-{index}", "pool-commit-ingest", []),
    "decontaminate": ("pool-decontaminate-shard", "decontaminate-shard-{index}", "pool-commit", []),
    "influence": ("influence-shard", "influence-shard-{index}", "influence-commit", ["gpu"]),
    "evaluate": ("evaluate", "evaluate", "evaluate-commit", ["gpu"]),  # one shard: the task the UI always showed
}


@task(name="stage-shard", task_run_name="shard-{index}", **RETRY, cache_policy=NO_CACHE)
def run_shard_task(stage: Stage[Any], plan: Any, shard: Any, index: int, cfg: RunConfig) -> ShardResult:
    """Do one shard of a stage and write its part (at once when its marker says a run finished it)."""
    return stage.run_shard(plan, shard, index, cfg)


@task(name="stage-commit", **RETRY, cache_policy=NO_CACHE)
def commit_task(
    stage: Stage[Any], plan: Any, results: list[ShardResult], cfg: RunConfig, elapsed_s: float
) -> Manifest:
    """Write a stage's manifest listing its shards' parts: from now on the dataset exists."""
    return stage.commit(plan, results, cfg, elapsed_s)


def _options(stage: Stage[Any]) -> tuple[str, str, str, list[str]]:
    name = stage.name
    return TASK_OPTIONS.get(name, (f"{name}-shard", f"{name}-shard-{{index}}", f"{name}-commit", []))


def shard_task(stage: Stage[Any]) -> Task:
    """The shard task of `stage`, under the names and tags the UI shows for it."""
    name, run_name, _, tags = _options(stage)
    return run_shard_task.with_options(name=name, task_run_name=run_name, tags=tags)


def stage_commit_task(stage: Stage[Any]) -> Task:
    """The commit task of `stage`."""
    _, _, name, _ = _options(stage)
    return commit_task.with_options(name=name, task_run_name=name)
