"""The influence flow: plan -> R's features per checkpoint -> one task per candidate shard -> top fraction and
manifest (a task), with a progress artifact, the funnel and the influence histogram.

Wiring only; the work is in synth_core.influence (its Stage), run by flows/stage.run_stage. Re-running with the
same candidates, R, checkpoints and config is free; a re-run after a crash redoes only the unfinished steps.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from flows.stage import run_stage
from synth_core.config import parse_config
from synth_core.influence import stage as influence


@flow(name="influence", log_prints=True)
def influence_flow(
    candidates: str,
    checkpoints: list[str],
    reference: str | None = None,
    config: dict[str, Any] | None = None,
    out: str | None = None,
) -> str:
    """Score every kept candidate by its gradient influence on R and keep the top fraction; return the URI."""
    cfg = parse_config(config)
    t0 = time.perf_counter()
    plan = influence.plan_influence(cfg, candidates, reference, checkpoints, out)
    return run_stage(influence.STAGE, plan, cfg, t0=t0).out_uri
