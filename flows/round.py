"""A whole self-distillation round: the pool, the bootstrap (when the run has no checkpoints yet), T iterations, then
the released dataset synthesised from the pool by the final synthesizer through the same score and filter, with
its data card.

Wiring only: every step is a stage flow (a subflow in the Prefect UI) or a task, every output content-addressed.
Re-running a round after a crash, a kill or a failed shard recomputes nothing that finished; `scoder run` and the
nightly deployment (deployments/prefect.yaml) run this flow.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.bootstrap import bootstrap_flow
from flows.iteration import as_subflow, filter_stages, iteration_flow
from flows.pool import pool_flow
from flows.sample import sample_flow
from synth_core.config import parse_config
from synth_core.release import build_release, funnel_section
from synth_core.round_plan import stage_config


@flow(name="round", log_prints=True)
def round_flow(config: dict[str, Any] | None = None, out: str | None = None, checkpoints: str | None = None) -> str:
    """Pool -> bootstrap (unless `checkpoints`, a train output, is given) -> T iterations -> the released dataset
    (written to `out`, or a location derived from its content). Returns the release's URI."""
    logger = get_run_logger()
    cfg = parse_config(config)
    t0 = time.perf_counter()
    rc = cfg.round
    data = cfg.model_dump(mode="json")
    stages: list[tuple[str, str]] = []
    pool = as_subflow(pool_flow, cfg)(config=data)
    stages.append(("pool", pool))
    if checkpoints is None:
        checkpoints = as_subflow(bootstrap_flow, cfg)(config=data, reference=rc.reference)
        stages.append(("bootstrap", checkpoints))
    for t in range(1, rc.iterations + 1):
        outs = iteration_flow.with_options(flow_run_name=f"iteration-{t}")(
            snippets=pool, checkpoints=checkpoints, iteration=t, reference=rc.reference, config=data
        )
        stages += [(f"iteration {t}: {stage}", uri) for stage, uri in outs.items()]
        checkpoints = outs["train"]
    # The release: the final synthesizer on seed snippets no iteration has used, through the same filters.
    scfg = stage_config(cfg, checkpoints, rc.iterations + 1)
    synth: dict[str, str] = {
        "sample": as_subflow(sample_flow, scfg)(snippets=pool, config=scfg.model_dump(mode="json"))
    }
    final = filter_stages(scfg, synth["sample"], checkpoints, rc.reference, synth)
    stages += [(f"synthesize: {stage}", uri) for stage, uri in synth.items()]
    release = build_release(cfg, final, stages, out)
    stages.append(("release", release))
    create_markdown_artifact(
        key="round-summary",
        markdown=f"# Round: {release}\n\n{funnel_section(stages, cfg)}",
        description=f"Every stage of the round, its funnel and its dataset; the release is {release}",
    )
    logger.info("round done in %.1f s: the release is %s", time.perf_counter() - t0, release)
    return release
