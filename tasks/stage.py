"""The Prefect tasks of every sharded stage (synth_core.stage.Stage): one task run per shard, one for the commit,
and one per setup step of a stage that has them (influence: R's features per checkpoint).

Three generic tasks, retried like every task (tasks/retry.py), and the names, run names and tags each stage's tasks
show in the Prefect UI (`TASK_NAMES`; a `gpu` tag lets a work pool route engine-heavy work). Idempotency lives in
synth_core (a finished shard's marker, the manifest's fingerprint), so no Prefect result cache is used: a cache
would claim "done" even after someone deleted the data. The commit is a task so that a storage hiccup while writing
the manifest is retried instead of failing the flow after every shard succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE

from synth_core.config import RunConfig
from synth_core.stage import Stage
from synth_core.storage import Manifest, ShardResult
from tasks.retry import RETRY


@dataclass(frozen=True)
class TaskNames:
    """What the UI calls one stage's tasks: the shard task and its runs, the commit, the setup task and its runs."""

    shard: str
    shard_run: str
    commit: str
    tags: list[str] = field(default_factory=list)  # of the shard and setup tasks; the commit is storage only
    setup: str = ""
    setup_run: str = ""


# The shard names are the ones the UI and the flow tests have always shown.
TASK_NAMES: dict[str, TaskNames] = {
    "sample": TaskNames("sample-shard", "sample-shard-{index}", "sample-commit", ["gpu"]),
    "score": TaskNames("score-shard", "score-shard-{index}", "score-commit", ["gpu"]),
    "ingest": TaskNames("pool-ingest-shard", "ingest-shard-{index}", "pool-commit-ingest"),
    "decontaminate": TaskNames("pool-decontaminate-shard", "decontaminate-shard-{index}", "pool-commit"),
    "influence": TaskNames(
        "influence-shard",
        "influence-shard-{index}",
        "influence-commit",
        ["gpu"],
        setup="influence-targets",
        setup_run="influence-targets-ckpt-{index}",
    ),
    "evaluate": TaskNames("evaluate", "evaluate", "evaluate-commit", ["gpu"]),  # one shard: the task it always was
}


@task(name="stage-setup", task_run_name="setup-{index}", **RETRY, cache_policy=NO_CACHE)
def run_setup_task(stage: Stage[Any], plan: Any, item: Any, index: int, cfg: RunConfig) -> Any:
    """One setup step of a stage (work its shards read), at once when a run of this fingerprint did it."""
    return stage.run_setup(plan, item, index, cfg)  # type: ignore[attr-defined]


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


def task_names(stage: Stage[Any]) -> TaskNames:
    """The UI names of `stage`'s tasks (derived from its name when it has no entry)."""
    n = stage.name
    return TASK_NAMES.get(n) or TaskNames(f"{n}-shard", f"{n}-shard-{{index}}", f"{n}-commit", [], f"{n}-setup")


def setup_task(stage: Stage[Any]) -> Task:
    """The setup task of `stage`, under the names and tags the UI shows for it."""
    names = task_names(stage)
    return run_setup_task.with_options(
        name=names.setup, task_run_name=names.setup_run or names.setup + "-{index}", tags=names.tags
    )


def shard_task(stage: Stage[Any]) -> Task:
    """The shard task of `stage`, under the names and tags the UI shows for it."""
    names = task_names(stage)
    return run_shard_task.with_options(name=names.shard, task_run_name=names.shard_run, tags=names.tags)


def stage_commit_task(stage: Stage[Any]) -> Task:
    """The commit task of `stage`."""
    names = task_names(stage)
    return commit_task.with_options(name=names.commit, task_run_name=names.commit)
