"""The score flow: plan (judge resolved, shards cut between seeds) -> one task per shard -> manifest, with a
progress artifact, the funnel and the score histogram.

Wiring only; the work is in synth_core.score through tasks/score.py. Re-running with the same candidates, judge
and config is free; a re-run after a crash redoes only the shards without a part.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact

from flows.runtime import run_shards
from synth_core import score
from synth_core.config import parse_config
from synth_core.report import funnel_markdown
from tasks import score as score_tasks


@flow(name="score", log_prints=True)
def score_flow(samples: str, config: dict[str, Any] | None = None, out: str | None = None) -> str:
    """Rate every kept candidate on every aspect, then keep the best of each seed; return the output URI."""
    logger = get_run_logger()
    cfg = parse_config(config)
    t0 = time.perf_counter()
    plan = score.plan_score(cfg, samples, out)
    logger.info(
        "score %s: %d rows of %s in %d shards, judge %s, aspects: %s",
        plan.fp,
        plan.rows,
        samples,
        len(plan.shards),
        plan.judge.ref,
        ", ".join(f"{a.name} ({a.kind}, w={a.weight:g})" for a in cfg.score.aspects),
    )
    if score.score_done(plan, cfg):
        logger.info("scores already at %s (fingerprint %s): nothing to do", plan.out_uri, plan.fp)
        return plan.out_uri
    score.prepare_output(plan, cfg)
    total = max(len(plan.shards), 1)
    progress = create_progress_artifact(progress=0.0, key="score-progress", description="score")
    submits = [partial(score_tasks.score_shard.submit, plan, shard, i, cfg) for i, shard in enumerate(plan.shards)]
    results = run_shards(submits, "score", progress, 0, total, window=cfg.score.parallel_shards)
    manifest = score.commit_score(plan, results, cfg, time.perf_counter() - t0)
    create_table_artifact(
        key="score-funnel", table=funnel_markdown(manifest.funnel), description=f"Score funnel: {plan.out_uri}"
    )
    create_markdown_artifact(
        key="score-histogram",
        markdown=score.score_histogram_markdown(plan.out_uri, cfg),
        description=f"Overall scores and aspect means: {plan.out_uri}",
    )
    s = manifest.stats
    logger.info(
        "scores written to %s: %d rows, %d kept; %s judgements at %s/s (prefix cache served %s of prompt tokens), "
        "%s executions at %s/s, peak %s MiB",
        plan.out_uri,
        manifest.num_rows,
        manifest.funnel.get("kept", 0),
        s["judgements"],
        s["judgements_per_s"],
        s["prefix_cache_hit_rate"],
        s["executions"],
        s["executions_per_s"],
        s["peak_memory_mb"],
    )
    return plan.out_uri
