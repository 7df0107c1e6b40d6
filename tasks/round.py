"""Prefect tasks of a round's own steps: the held-out split of R, the held-out loss of a synthesizer, the random
selection ablation, the fit of the aspect weights, the convergence record of each iteration, the release and the
round's report (one task run each).

Thin wrappers over synth_core.convergence, synth_core.random_selection, synth_core.score_fit, synth_core.release
and synth_core.round_report; each skips work whose output (fingerprinted) already exists, so no Prefect result
cache is used. Retried like every task: the convergence records and the release read and write storage, which a
hiccup must not turn into a failed round after every stage succeeded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from synth_core import convergence, problem_dedup, random_selection, release, round_report, score_fit
from synth_core.config import RunConfig
from tasks.retry import RETRY


@task(name="split-reference", **RETRY, cache_policy=NO_CACHE)
def split_reference(cfg: RunConfig, reference: str | None) -> str:
    """R with round.holdout_fraction of its rows rejected as `holdout`; returns the split's URI."""
    return convergence.split_reference(reference, cfg.round.holdout_fraction, cfg.round.seed, cfg)


@task(name="heldout-loss", **RETRY, cache_policy=NO_CACHE, tags=["gpu"])
def heldout_loss(cfg: RunConfig, train_out: str, split: str) -> str:
    """Loss of the train output's last checkpoint on the held-out rows of R; returns its one-row dataset."""
    return convergence.heldout_loss(cfg, train_out, split)


@task(name="random-selection", **RETRY, cache_policy=NO_CACHE)
def select_random(cfg: RunConfig, samples: str, filtered: str) -> str:
    """As many samples as `filtered` keeps, drawn at random among those the filters may keep (ablation)."""
    return random_selection.select_random(samples, filtered, cfg.round.seed, cfg.storage)


@task(name="dedup-problems", **RETRY, cache_policy=NO_CACHE)
def dedup_problems(cfg: RunConfig, candidates: str) -> str:
    """The kept rows of `candidates` without near-duplicate problems (the best-ranked of each group stays; the
    others are rejected as duplicate_problem, naming it); returns the output's URI."""
    return problem_dedup.dedup_problems(candidates, cfg)


@task(name="fit-weights", **RETRY, cache_policy=NO_CACHE)
def fit_weights(cfg: RunConfig, scored: str | None) -> dict:
    """The round's aspect weights: fitted to the teacher's judgements of `scored` when a teacher is configured
    (round.fit_weights), else the config's; a synth_core.score_fit.round_weights record."""
    return score_fit.round_weights(cfg, scored)


@task(name="round-report", **RETRY, cache_policy=NO_CACHE)
def write_report(cfg: RunConfig, evals: dict[str, str | None], folder: str, title: str, notes: str = "") -> str:
    """report.md + pass_at_1.png + report.json in `folder` from evaluation outputs (and `notes`, markdown, after the
    table); returns the report's markdown."""
    return round_report.write_report(evals, folder, cfg, title=title, notes=notes)


@task(name="convergence-record", task_run_name="convergence-{iteration}", **RETRY, cache_policy=NO_CACHE)
def convergence_record(
    cfg: RunConfig, iteration: int | str, stages: Mapping[str, str], loss_uri: str | None
) -> dict[str, Any]:
    """One iteration's convergence record (synth_core.convergence.convergence_record): survival per filter, kept
    rows, training and held-out losses, what the sampling shows."""
    return convergence.convergence_record(iteration, stages, loss_uri, cfg)


@task(name="probe-evidence", **RETRY, cache_policy=NO_CACHE)
def probe_evidence(cfg: RunConfig, sample_uri: str, synthesizers: Sequence[tuple[str, Sequence[str]]]) -> dict:
    """Per synthesizer, what its answers on the probe's seeds show, and a per-seed sign test against the bootstrap
    (synth_core.convergence.probe_evidence)."""
    return convergence.probe_evidence(sample_uri, synthesizers, cfg)


@task(name="release", **RETRY, cache_policy=NO_CACHE)
def build_release(
    cfg: RunConfig,
    final: str,
    stages: Sequence[tuple[str, str]],
    out: str | None,
    extra_card: str,
    extra_stats: dict[str, Any],
) -> str:
    """The release (kept rows as chat messages + lineage) with its data card; returns its URI."""
    return release.build_release(cfg, final, stages, out, extra_card=extra_card, extra_stats=extra_stats)
