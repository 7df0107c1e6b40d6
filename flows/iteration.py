"""One self-distillation iteration as a DAG of stage flows: sample -> score (+ initial selection) -> influence ->
train, every stage's shards mapped as tasks, datasets passed as URIs.

Wiring only. Each stage is its own (sub)flow, so the Prefect UI shows the iteration as a tree of stages, each with
its shard task runs, funnel and histograms; each is content-addressed, so re-running an iteration recomputes only
what did not finish. The round flow (flows/round.py) chains iterations; synth_core.round_plan says how iteration
t configures its stages.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.influence import influence_flow
from flows.runtime import make_task_runner
from flows.sample import sample_flow
from flows.score import score_flow
from synth_core.config import RunConfig, parse_config
from synth_core.round_plan import stage_config, training_data
from tasks.round import select_random
from tasks.train import train_task


def as_subflow(flow_fn: Any, cfg: RunConfig) -> Any:
    """A stage flow run inside another flow, with the task runner the config asks for (a subflow otherwise gets
    Prefect's default thread pool, whatever its parent uses)."""
    return flow_fn.with_options(task_runner=make_task_runner(cfg))


def filter_stages(
    cfg: RunConfig, samples: str, checkpoints: str, reference: str | None, stages: dict[str, str]
) -> str:
    """Score (with its initial selection) and influence-filter `samples` as the round config says (or, with
    round.random_selection, keep as many at random among the rows the filters may keep); records each stage's
    output in `stages`; returns the last one (what training or the release reads)."""
    current = samples
    if cfg.round.use_scorer:
        current = as_subflow(score_flow, cfg)(samples=current, config=cfg.model_dump(mode="json"))
        stages["score"] = current
    if cfg.round.use_influence:
        current = as_subflow(influence_flow, cfg)(
            candidates=current, checkpoints=[checkpoints], reference=reference, config=cfg.model_dump(mode="json")
        )
        stages["influence"] = current
    if cfg.round.random_selection:  # ablation: as many rows as the filters kept, at random among those they may keep
        current = select_random(cfg, samples, current)
        stages["random_selection"] = current
    return current


@flow(name="iteration", log_prints=True, flow_run_name="iteration-{iteration}")
def iteration_flow(
    snippets: str,
    checkpoints: str,
    iteration: int = 1,
    reference: str | None = None,
    config: dict[str, Any] | None = None,
    earlier_kept: list[str] | None = None,
) -> dict[str, str]:
    """Iteration `iteration`: sample from `checkpoints` (a train output), score, filter by influence, train on R +
    the kept rows (+ `earlier_kept`, earlier iterations' kept rows, with round.accumulate_kept). Returns the URI of
    every stage's output ("train" holds the next checkpoints)."""
    logger = get_run_logger()
    cfg = parse_config(config)
    icfg = stage_config(cfg, checkpoints, iteration)
    stages: dict[str, str] = {}
    stages["sample"] = as_subflow(sample_flow, icfg)(snippets=snippets, config=icfg.model_dump(mode="json"))
    kept = filter_stages(icfg, stages["sample"], checkpoints, reference, stages)
    stages["train"] = train_task(icfg, training_data(icfg, reference, kept, earlier_kept), None, None)
    logger.info("iteration %d: %s", iteration, ", ".join(f"{k} {v}" for k, v in stages.items()))
    return stages
