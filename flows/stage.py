"""`run_stage`: how every stage flow runs a planned synth_core.stage.Stage under Prefect.

done? -> prepare -> [a task per setup step ->] one task per shard (at most the stage's window in flight, a
progress artifact) -> the commit as a task -> the stage's artifacts (its funnel table, histograms) -> one log
line. Wiring only: what each step does is the stage's (synth_core), the tasks are tasks/stage.py's. A stage flow
plans, then calls this.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from flows.runtime import run_shards
from synth_core.config import RunConfig
from synth_core.stage import Stage, StageArtifact, StageRun, done_message, setup_items
from tasks import stage as stage_tasks


@dataclass
class Progress:
    """A stage's progress artifact, created when the first shard is submitted (a run with nothing to do shows
    none); several steps of one flow may share it (the pool's ingest and decontamination)."""

    key: str
    description: str
    done_before: int
    total: int
    artifact_id: Any = None

    def id(self) -> Any:
        from prefect.artifacts import create_progress_artifact

        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(progress=0.0, key=self.key, description=self.description)
        return self.artifact_id


def run_stage(
    stage: Stage[Any], plan: Any, cfg: RunConfig, *, t0: float | None = None, progress: Progress | None = None
) -> StageRun:
    """Run a planned stage: shards and commit as retried tasks. `t0` (perf_counter) is when the stage began,
    planning included; `progress` a shared progress artifact (default: one of the stage's own)."""
    from prefect import get_run_logger

    logger = get_run_logger()
    t0 = time.perf_counter() if t0 is None else t0
    out = stage.out_uri(plan)
    logger.info(stage.describe(plan, cfg))
    if stage.done(plan, cfg):
        logger.info(done_message(stage, plan))
        return StageRun(out, None)
    stage.prepare(plan, cfg)
    setup, shards = setup_items(stage, plan), list(stage.shards(plan))
    if progress is None:
        progress = Progress(f"{stage.name}-progress", stage.name, 0, max(len(setup) + len(shards), 1))
    window = stage.window(cfg)
    if setup:  # what every shard reads (influence: R's features), first, as many at once as shards may run
        task = stage_tasks.setup_task(stage)
        submits = [partial(task.submit, stage, plan, item, i, cfg) for i, item in enumerate(setup)]
        run_shards(submits, f"{stage.name} setup", progress.id(), progress.done_before, progress.total, window)
    task = stage_tasks.shard_task(stage)
    submits = [partial(task.submit, stage, plan, shard, i, cfg) for i, shard in enumerate(shards)]
    done_before = progress.done_before + len(setup)
    results = run_shards(submits, stage.name, progress.id(), done_before, progress.total, window=window)
    manifest = stage_tasks.stage_commit_task(stage)(stage, plan, results, cfg, time.perf_counter() - t0)
    for artifact in stage.artifacts(plan, manifest, cfg):
        publish(artifact)
    logger.info(stage.summary(plan, manifest))
    return StageRun(out, manifest, results, time.perf_counter() - t0)


def publish(artifact: StageArtifact) -> None:
    """Create one artifact in the flow run: a table when it has records, else markdown."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    if artifact.table is not None:
        create_table_artifact(key=artifact.key, table=artifact.table, description=artifact.description)
    else:
        create_markdown_artifact(key=artifact.key, markdown=artifact.markdown, description=artifact.description)
