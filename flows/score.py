"""The score flow: plan (judge resolved, shards cut between seeds) -> one task per shard -> the manifest (a task),
with a progress artifact, the funnel and the score histogram.

Wiring only; the work is in synth_core.score (its Stage), run by flows/stage.run_stage. Re-running with the same
candidates, judge and config is free; a re-run after a crash redoes only the shards without a part.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from flows.stage import run_stage
from synth_core import score
from synth_core.config import parse_config


@flow(name="score", log_prints=True)
def score_flow(samples: str, config: dict[str, Any] | None = None, out: str | None = None) -> str:
    """Rate every kept candidate on every aspect, then keep the best of each seed; return the output URI."""
    cfg = parse_config(config)
    t0 = time.perf_counter()
    return run_stage(score.STAGE, score.plan_score(cfg, samples, out), cfg, t0=t0).out_uri
