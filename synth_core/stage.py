"""The run sequence of a sharded stage, written once: the `Stage` protocol and the in-process runner.

A stage (sample, score, influence, the pool's ingest and decontamination steps, an evaluation) is a small object
in the datatrove shape: a step whose methods an executor calls in a fixed order,

    plan = <the stage's own plan function>(cfg, inputs...)   what to do, where (fingerprint, output), the shards
    done(plan, cfg)?            the output already holds this fingerprint: nothing to do, re-running is free
    prepare(plan, cfg)          hide another dataset's manifest at the output before any part is written
    run_setup(plan, item, i)    optional: work every shard reads, for each item of setup(plan) (influence: R's
                                features per checkpoint); a stage without it has no such step
    run_shard(plan, shard, i)   one shard -> its part (at once when its marker says it is finished)
    commit(plan, results, ...)  the manifest, written last: from now on the dataset exists
    describe / summary / artifacts   the log lines before and after, and what the UI shows

The executors are apart: `run_stage_local` here runs the shards one after the other in this process (a notebook,
a test, a bench); flows/stage.py runs each shard and the commit as retried Prefect tasks (tasks/stage.py). A stage
object holds no state (its plan does), so it pickles to any worker. This module knows nothing of Prefect.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from synth_core.config import RunConfig
    from synth_core.storage import Manifest, ShardResult

PlanT = TypeVar("PlanT")


@dataclass(frozen=True)
class StageArtifact:
    """One artifact a stage shows after its commit: a markdown text, or a table of records (`table` set)."""

    key: str
    description: str
    markdown: str = ""
    table: list[dict[str, Any]] | None = None


@dataclass
class StageRun:
    """What running a stage gives its caller: the output, its manifest (None when it was already done), the shard
    results and the seconds the run took."""

    out_uri: str
    manifest: Manifest | None
    results: list[ShardResult] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def was_done(self) -> bool:
        return self.manifest is None


class Stage(Protocol[PlanT]):
    """A sharded stage; see the module docstring for the order an executor calls these in.

    `name` names the stage's tasks, progress bar and log lines (tasks/stage.py maps it to the task names the
    Prefect UI shows). A stage may also define `setup(plan) -> Sequence` and `run_setup(plan, item, index, cfg)`:
    steps that run before the first shard (`setup_items` reads them; optional, so that the other stages do not
    each spell out an empty one)."""

    name: str

    def out_uri(self, plan: PlanT) -> str:
        """Where the stage writes."""
        ...

    def fingerprint(self, plan: PlanT) -> str:
        """The output's fingerprint."""
        ...

    def done(self, plan: PlanT, cfg: RunConfig) -> bool:
        """True when the output already holds exactly this dataset: re-running is free."""
        ...

    def prepare(self, plan: PlanT, cfg: RunConfig) -> None:
        """Before any shard writes: hide another dataset's manifest at the output."""
        ...

    def shards(self, plan: PlanT) -> Sequence[Any]:
        """The shards, in order; shard i writes part i."""
        ...

    def window(self, cfg: RunConfig) -> int | None:
        """At most this many shards in flight (an engine each); None = all at once."""
        ...

    def run_shard(self, plan: PlanT, shard: Any, index: int, cfg: RunConfig) -> ShardResult:
        """Do shard `index` and write its part; at once when a run of this fingerprint finished it."""
        ...

    def commit(self, plan: PlanT, results: list[ShardResult], cfg: RunConfig, elapsed_s: float) -> Manifest:
        """Write the manifest listing the shards' parts (`elapsed_s`: the stage's wall time so far)."""
        ...

    def describe(self, plan: PlanT, cfg: RunConfig) -> str:
        """The log line before the shards run."""
        ...

    def summary(self, plan: PlanT, manifest: Manifest) -> str:
        """The log line after the commit."""
        ...

    def artifacts(self, plan: PlanT, manifest: Manifest, cfg: RunConfig) -> list[StageArtifact]:
        """What the UI shows after the commit (the funnel table, histograms)."""
        ...


def setup_items(stage: Stage[Any], plan: Any) -> list[Any]:
    """The setup steps of a stage (its optional `setup(plan)`); [] for a stage without."""
    setup = getattr(stage, "setup", None)
    return list(setup(plan)) if setup is not None else []


def done_message(stage: Stage[Any], plan: Any) -> str:
    """The log line of a stage whose output is already there."""
    return f"{stage.name}: already at {stage.out_uri(plan)} (fingerprint {stage.fingerprint(plan)}): nothing to do"


def funnel_artifact(key: str, title: str, manifest: Manifest, out_uri: str) -> StageArtifact:
    """The funnel table every stage shows: rows in, kept, rejected per reason."""
    from synth_core.report import funnel_markdown

    return StageArtifact(key=key, description=f"{title} funnel: {out_uri}", table=funnel_markdown(manifest.funnel))


def run_stage_local(stage: Stage[PlanT], plan: PlanT, cfg: RunConfig, t0: float | None = None) -> StageRun:
    """Run a planned stage in this process, shard after shard (no orchestrator). `t0` (perf_counter) is when the
    stage began, planning included; default now."""
    t0 = time.perf_counter() if t0 is None else t0
    out = stage.out_uri(plan)
    if stage.done(plan, cfg):
        return StageRun(out, None)
    stage.prepare(plan, cfg)
    for i, item in enumerate(setup_items(stage, plan)):
        stage.run_setup(plan, item, i, cfg)  # type: ignore[attr-defined]
    results = [stage.run_shard(plan, shard, i, cfg) for i, shard in enumerate(stage.shards(plan))]
    manifest = stage.commit(plan, results, cfg, time.perf_counter() - t0)
    return StageRun(out, manifest, results, time.perf_counter() - t0)
