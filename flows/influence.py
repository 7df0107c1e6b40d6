"""The influence flow: plan -> R's features per checkpoint -> one task per candidate shard -> top fraction and
manifest, with a progress artifact, the funnel and the influence histogram.

Wiring only; the work is in synth_core.influence through tasks/influence.py. Re-running with the same
candidates, R, checkpoints and config is free; a re-run after a crash redoes only the unfinished steps.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact

from flows.runtime import run_shards
from synth_core import influence
from synth_core.config import parse_config
from synth_core.report import funnel_markdown
from tasks import influence as influence_tasks


@flow(name="influence", log_prints=True)
def influence_flow(
    candidates: str,
    checkpoints: list[str],
    reference: str | None = None,
    config: dict[str, Any] | None = None,
    out: str | None = None,
) -> str:
    """Score every kept candidate by its gradient influence on R and keep the top fraction; return the URI."""
    logger = get_run_logger()
    cfg = parse_config(config)
    t0 = time.perf_counter()
    plan = influence.plan_influence(cfg, candidates, reference, checkpoints, out)
    logger.info(
        "influence %s: %d rows to score in %d shards, %d checkpoints, %d reference rows, on %s",
        plan.fp,
        plan.scorable_rows,
        len(plan.shards),
        len(plan.checkpoints),
        plan.reference_rows,
        plan.device_type,
    )
    if influence.influence_done(plan, cfg):
        logger.info("influence already at %s (fingerprint %s): nothing to do", plan.out_uri, plan.fp)
        return plan.out_uri
    influence.prepare_output(plan, cfg)
    n_targets = len(plan.checkpoints) if plan.scorable_rows else 0
    total = max(n_targets + len(plan.shards), 1)
    progress = create_progress_artifact(progress=0.0, key="influence-progress", description="influence")
    targets = [partial(influence_tasks.target_features.submit, plan, c, cfg) for c in range(n_targets)]
    # R's features first (every shard reads them), as many at once as shards may run.
    window = cfg.influence.parallel_shards
    run_shards(targets, "influence targets", progress, 0, total, window=window)
    submits = [
        partial(influence_tasks.influence_shard.submit, plan, shard, i, cfg) for i, shard in enumerate(plan.shards)
    ]
    results = run_shards(submits, "influence", progress, n_targets, total, window=window)
    manifest = influence.commit_influence(plan, results, cfg, time.perf_counter() - t0)
    create_table_artifact(
        key="influence-funnel",
        table=funnel_markdown(manifest.funnel),
        description=f"Influence funnel: {plan.out_uri}",
    )
    create_markdown_artifact(
        key="influence-histogram",
        markdown=influence.histogram_markdown(plan.out_uri, cfg),
        description=f"Influence scores: {plan.out_uri}",
    )
    s = manifest.stats
    logger.info(
        "influence written to %s: %d rows, %d scored, %d kept; %s features/s, %s tokens/s, peak %s MiB; notes: %s",
        plan.out_uri,
        manifest.num_rows,
        s["scored"],
        s["kept"],
        s["features_per_s"],
        s["tokens_per_s"],
        s["peak_memory_mb"],
        "; ".join(s["notes"]) or "none",
    )
    return plan.out_uri
