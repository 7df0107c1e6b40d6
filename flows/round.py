"""A whole self-distillation round: the pool, the bootstrap (when the run has no checkpoints yet), T iterations, then
the released dataset synthesised from the pool by the final synthesizer through the same score and filter, without
near-duplicate problems (round.release_dedup), with its data card; with round.probe_snippets, the probe (every
synthesizer on the same unused seeds) in the card.

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
from flows.evaluate import evaluate_flow
from flows.iteration import as_subflow, filter_stages, iteration_flow
from flows.pool import pool_flow
from flows.sample import sample_flow
from synth_core import score_fit
from synth_core.config import RunConfig, parse_config
from synth_core.convergence import FILTER_STAGES, best_synthesizer, convergence_markdown, probe_markdown
from synth_core.reference import BUILTIN_REFERENCE
from synth_core.release import funnel_section
from synth_core.round_estimate import check_pool_feeds
from synth_core.round_plan import dated_config, parse_run_date, probe_config, probe_synthesizers, stage_config
from synth_core.score_fit import weights_card_section
from synth_core.storage import dataset_exists, kept_rows
from tasks import round as round_tasks


@flow(name="round", log_prints=True)
def round_flow(
    config: dict[str, Any] | None = None,
    out: str | None = None,
    checkpoints: str | None = None,
    run_date: str | None = None,
) -> str:
    """Pool -> bootstrap (unless `checkpoints`, a train output, is given) -> T iterations -> the released dataset
    (written to `out`, or a location derived from its content). Returns the release's URI.

    `run_date` (YYYY-MM-DD, 'today', or 'scheduled' = the flow run's scheduled date; the nightly deployment's
    setting) gives that date's round: new seed snippets and samples each night, the same on a re-run of the night
    (synth_core.round_plan.dated_config). None = the config alone decides, so a re-run recomputes nothing."""
    logger = get_run_logger()
    cfg = parse_config(config)
    t0 = time.perf_counter()
    data = cfg.model_dump(mode="json")
    stages: list[tuple[str, str]] = []
    pool = as_subflow(pool_flow, cfg)(config=data)
    stages.append(("pool", pool))
    if run_date is not None:
        from prefect.runtime import flow_run

        date = parse_run_date(run_date, flow_run.scheduled_start_time if run_date == "scheduled" else None)
        cfg = dated_config(cfg, date, kept_rows(pool, cfg.storage))
        data = cfg.model_dump(mode="json")
        logger.info(
            "round of %s: seed snippets from #%d, generation seed %d",
            date,
            cfg.round.first_snippet,
            cfg.sample.generation.seed,
        )
    # Before any bootstrap or engine: can the pool feed every stage's seeds? (One line naming the stage and the
    # shortfall; with round.seed_shortfall 'warn' the round goes on and says so.)
    for line in check_pool_feeds(cfg, kept_rows(pool, cfg.storage)):
        logger.warning(line)
        create_markdown_artifact(
            key="round-seed-shortfall", markdown=f"# Warning: seed shortfall\n\n{line}\n", description=line[:200]
        )
    rc = cfg.round
    # R with its held-out rows marked: every training and the influence targets read its other rows only.
    split = round_tasks.split_reference(cfg, rc.reference) if rc.holdout_fraction > 0 else None
    reference = split or rc.reference
    if checkpoints is None:
        checkpoints = as_subflow(bootstrap_flow, cfg)(config=data, reference=reference)
        stages.append(("bootstrap", checkpoints))
    base_samples = None
    if rc.compare_base:  # the untrained synthesizer on iteration 1's seeds: what the bootstrap changed
        bcfg = stage_config(cfg, checkpoints, 1)
        bcfg.sample.checkpoints = [cfg.models.synthesizer]
        base_samples = as_subflow(sample_flow, bcfg).with_options(flow_run_name="sample-base-model")(
            snippets=pool, config=bcfg.model_dump(mode="json")
        )
        stages.append(("base model: sample", base_samples))
    iterations: list[dict[str, str]] = [{"train": checkpoints}]  # 0: the starting synthesizer, no filters
    weights = score_fit.round_weights(cfg)  # the config's, until a teacher's judgements refit them
    for t in range(1, rc.iterations + 1):
        earlier = [kept_data(o) for o in iterations[1:]]  # used with round.accumulate_kept
        outs = iteration_flow.with_options(flow_run_name=f"iteration-{t}")(
            snippets=pool, checkpoints=checkpoints, iteration=t, reference=reference, config=data, earlier_kept=earlier
        )
        stages += [(f"iteration {t}: {stage}", uri) for stage, uri in outs.items()]
        checkpoints = outs["train"]
        iterations.append(outs)
        if t == 1 and rc.fit_weights and cfg.teacher.model and "score" in outs:
            # Teacher-judge -> NNLS on iteration 1's scored candidates; later iterations and the release use them.
            weights = round_tasks.fit_weights(cfg, outs["score"])
            cfg = score_fit.apply_weights(cfg, weights["weights"])
            data = cfg.model_dump(mode="json")
            logger.info("aspect weights fitted to the teacher: %s", weights["weights"])
    probe = run_probe(cfg, pool, iterations, stages) if rc.probe_snippets else None
    if probe and rc.release_from == "best_probe":  # early stopping on the probe's held-out seeds
        best = best_synthesizer(probe)
        probe["release_from"] = probe["records"][best]["synthesizer"]
        # The probe's records are [base model (compare_base)], bootstrap, iteration 1..T: iterations' order.
        checkpoints = iterations[best - (1 if rc.compare_base else 0)]["train"]
        logger.info("the release is written by the %s (round.release_from: best_probe)", probe["release_from"])
    # The release: the final (or the probe's best) synthesizer on seed snippets no iteration has used, through the
    # same filters.
    scfg = stage_config(cfg, checkpoints, rc.iterations + 1)
    synth: dict[str, str] = {
        "sample": as_subflow(sample_flow, scfg)(snippets=pool, config=scfg.model_dump(mode="json"))
    }
    final = filter_stages(scfg, synth["sample"], checkpoints, reference, synth)
    if rc.release_dedup:  # a student should not see one problem twice
        final = synth["dedup"] = round_tasks.dedup_problems(scfg, final)
    stages += [(f"synthesize: {stage}", uri) for stage, uri in synth.items()]
    record = round_tasks.convergence_record
    convergence = [record(cfg, "base", {"sample": base_samples}, None)] if base_samples else []
    convergence += [
        record(cfg, t, outs, round_tasks.heldout_loss(cfg, outs["train"], split) if split else None)
        for t, outs in enumerate(iterations)
    ]
    convergence.append(record(cfg, "release", synth, None))
    conv_md = convergence_section(convergence, split)
    if probe:
        conv_md += "\n" + probe_markdown(probe)
    create_markdown_artifact(
        key="round-convergence",
        markdown=conv_md,
        description="Per iteration and the release: filter survival, losses, what the sampling shows",
    )
    release = round_tasks.build_release(
        cfg,
        final,
        stages,
        out,
        extra_card=conv_md + "\n" + weights_card_section(weights) + "\n",
        extra_stats={"convergence": convergence, "split": split, "aspect_weights": weights, "probe": probe},
    )
    stages.append(("release", release))
    create_markdown_artifact(
        key="round-summary",
        markdown=f"# Round: {release}\n\n{funnel_section(stages, cfg)}",
        description=f"Every stage of the round, its funnel and its dataset; the release is {release}",
    )
    if rc.evaluate:
        evaluate_round(cfg, reference, iterations, release, notes="\n" + probe_markdown(probe) if probe else "")
    logger.info("round done in %.1f s: the release is %s", time.perf_counter() - t0, release)
    return release


def run_probe(
    cfg: RunConfig, pool: str, iterations: list[dict[str, str]], stages: list[tuple[str, str]]
) -> dict[str, Any]:
    """The probe (round.probe_snippets): one sample stage in which every synthesizer of the round samples the same
    unused seeds, then its per-synthesizer evidence. Appends the sample output to `stages`."""
    groups = probe_synthesizers(cfg, [outs["train"] for outs in iterations], base=cfg.round.compare_base)
    pcfg, groups = probe_config(cfg, groups)
    uri = as_subflow(sample_flow, pcfg).with_options(flow_run_name="sample-probe")(
        snippets=pool, config=pcfg.model_dump(mode="json")
    )
    stages.append(("probe: sample", uri))
    return round_tasks.probe_evidence(cfg, uri, groups)


def convergence_section(records: list[dict[str, Any]], split: str | None) -> str:
    """The data card's (and the artifact's) convergence section."""
    rows = max(r["heldout_rows"] for r in records)
    held = f"{rows} held-out rows of R (`{split}`)" if split else "no held-out rows (off)"
    return (
        "## Convergence\n\nPer iteration (bootstrap: the synthesizer it starts from; release: the released "
        "dataset's stages): candidates sampled, the share of its input each filter kept, the rows kept, the "
        "training loss over the first and the last tenth of the iteration's training, and the mean loss of its last "
        f"checkpoint on {held}. The second table is what each sampling shows of the synthesizer: the share of "
        "candidates in the format, past the junk screen, and whose code passed its own asserts in the sandbox; the "
        "share of parsed problems that are not near duplicates of another (the pool's MinHash); rows kept per hour "
        "of the stages' wall time; the judge's mean score (0-9) per aspect.\n\n"
        f"{convergence_markdown(records)}\n"
    )


def kept_data(outs: dict[str, str]) -> str:
    """What an iteration trained on besides R: the output of its last filter."""
    return next(outs[s] for s in reversed(FILTER_STAGES) if s in outs)


def _has_rows(uri: str, cfg: RunConfig) -> bool:
    if not dataset_exists(uri, cfg.storage):
        return True  # a reference file: its rows are checked when read
    return kept_rows(uri, cfg.storage) > 0


def evaluate_round(
    cfg: RunConfig, reference: str | None, iterations: list[dict[str, str]], release: str, notes: str = ""
) -> str:
    """A student fine-tuned and evaluated on R, each iteration's kept data and the release (one evaluation flow
    each); the report (table + PNG, then `notes`: the probe) next to the data card and as an artifact. Returns the
    report's markdown."""
    data = cfg.model_dump(mode="json")
    runs = [("bootstrap (R)", reference or BUILTIN_REFERENCE)]
    runs += [(f"iteration {t}", kept_data(outs)) for t, outs in enumerate(iterations) if t]
    runs.append(("release", release))
    evals: dict[str, str | None] = {}
    for label, uri in runs:
        name = "evaluate-" + label.replace(" (R)", "").replace(" ", "-")
        run = as_subflow(evaluate_flow, cfg).with_options(flow_run_name=name)
        evals[label] = run(config=data, data=uri) if _has_rows(uri, cfg) else None
    md = round_tasks.write_report(cfg, evals, release, f"Round report: {cfg.round.release_name}", notes)
    create_markdown_artifact(key="round-report", markdown=md, description=f"pass@1 per iteration; files in {release}")
    return md
