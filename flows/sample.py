"""The sample flow: plan (checkpoints resolved) -> one task per shard -> manifest, with progress and funnel.

Wiring only; the work is in synth_core.sample (its Stage), run by flows/stage.run_stage. Re-running with the same pool,
config and checkpoints is free; a re-run after a crash redoes only the shards without a part.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.stage import run_stage
from synth_core import sample
from synth_core.config import parse_config


@flow(name="sample", log_prints=True)
def sample_flow(snippets: str, config: dict[str, Any] | None = None, out: str | None = None) -> str:
    """Sample problem+solution pairs from every checkpoint for every kept seed snippet; return the URI."""
    cfg = parse_config(config)
    t0 = time.perf_counter()
    plan = sample.plan_sample(cfg, snippets, out)  # raises on a seed shortfall unless round.seed_shortfall: warn
    if plan.seed_shortfall:
        create_markdown_artifact(
            key="sample-seed-shortfall",
            markdown=f"# Warning: seed shortfall\n\n{sample.shortfall_message(plan, cfg)}\n",
            description="The pool had fewer seed snippets than this sample stage asked for",
        )
    return run_stage(sample.STAGE, plan, cfg, t0=t0).out_uri
