"""The sample flow: plan (checkpoints resolved) -> one task per shard -> manifest, with progress and funnel.

Wiring only; the work is in synth_core.sample through tasks/sample.py. Re-running with the same pool,
config and checkpoints is free; a re-run after a crash redoes only the shards without a part.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact

from flows.runtime import run_shards
from synth_core import sample
from synth_core.config import parse_config
from synth_core.report import funnel_markdown
from tasks import sample as sample_tasks


@flow(name="sample", log_prints=True)
def sample_flow(snippets: str, config: dict[str, Any] | None = None, out: str | None = None) -> str:
    """Sample problem+solution pairs from every checkpoint for every kept seed snippet; return the URI."""
    logger = get_run_logger()
    cfg = parse_config(config)
    t0 = time.perf_counter()
    plan = sample.plan_sample(cfg, snippets, out)  # raises on a seed shortfall unless round.seed_shortfall: warn
    if plan.seed_shortfall:
        create_markdown_artifact(
            key="sample-seed-shortfall",
            markdown=f"# Warning: seed shortfall\n\n{sample.shortfall_message(plan, cfg)}\n",
            description="The pool had fewer seed snippets than this sample stage asked for",
        )
    ckpts = ", ".join(m.ref for m in plan.checkpoints)
    logger.info("samples %s: %d shards of %s, checkpoints: %s", plan.fp, len(plan.shards), snippets, ckpts)
    if sample.samples_done(plan, cfg):
        logger.info("samples already at %s (fingerprint %s): nothing to do", plan.out_uri, plan.fp)
        return plan.out_uri
    sample.prepare_output(plan, cfg)
    total = max(len(plan.shards), 1)
    progress = create_progress_artifact(progress=0.0, key="sample-progress", description="sample")
    submits = [partial(sample_tasks.sample_shard.submit, plan, shard, i, cfg) for i, shard in enumerate(plan.shards)]
    results = run_shards(submits, "sample", progress, 0, total, window=cfg.sample.parallel_shards)
    manifest = sample.commit_samples(plan, results, cfg, time.perf_counter() - t0)
    create_table_artifact(
        key="sample-funnel", table=funnel_markdown(manifest.funnel), description=f"Sample funnel: {plan.out_uri}"
    )
    s = manifest.stats
    logger.info(
        "samples written to %s: %d rows, %d kept; %s output tokens at %s tokens/s, engine loads %.1f s",
        plan.out_uri,
        manifest.num_rows,
        manifest.funnel.get("kept", 0),
        s["output_tokens"],
        s["output_tokens_per_s"],
        s["engine_load_s"],
    )
    return plan.out_uri
