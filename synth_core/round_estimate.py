"""The round planner (`scoder run --plan`): what a config asks of its pool and devices, before anything runs.

From the config alone (no model is loaded, no pool is built) it derives, per sample stage of a round (iterations
1..T and the release): the seed snippets it takes, the candidates it samples, the rows left after each filter at
the rates of the `plan:` section, and the device-hours of sampling, judging, influence and training at its
throughputs; with round.probe_snippets, the probe's seeds and sampling hours (every synthesizer, no filter).
Every rate and throughput carries its basis (measured or inferred), and the printout says which.

It also answers the question the sample stage would answer too late: can the pool feed the plan? `seed_windows`
lays out which kept snippets each stage takes (synth_core.round_plan's arithmetic) and `check_pool_feeds` fails
with one line naming the first stage that runs dry and by how much; the round flow calls it right after the pool,
before any bootstrap or engine starts.

Filter model (expected values, not a simulation): a seed's C = checkpoints x samples_per_prompt candidates each
survive the sample stage's checks with p = format_rate x asserts_pass_rate (asserts only when the stage requires
passing them) and the judge's threshold with q = min_score_pass_rate; the scorer keeps min(top_k_per_seed,
survivors) per seed, so the rows after scoring are seeds x E[min(k, Binomial(C, p q))]; influence keeps
ceil(keep_fraction x rows). Knows nothing of Prefect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from synth_core.config import ConfigError, PlanEstimate, RunConfig
from synth_core.round_plan import first_snippet, probe_first_snippet


class PoolTooSmallError(ConfigError):
    """The pool has fewer kept seed snippets than the round's stages ask for."""


@dataclass
class StageEstimate:
    """One sample stage of a round (an iteration or the release) and what follows it."""

    label: str  # "iteration 2" | "release" | "probe"
    first: int  # kept snippets skipped before its seeds
    requested: int | None  # seeds it asks for; None = every kept snippet left
    seeds: int  # seeds the pool gives it
    candidates: float  # seeds x checkpoints x samples_per_prompt
    after: list[tuple[str, float]] = field(default_factory=list)  # (filter, rows left), in pipeline order
    train_rows: float = 0.0  # rows its training reads (R + kept); 0 for the release
    hours: dict[str, float] = field(default_factory=dict)  # device-hours per stage

    @property
    def rows_out(self) -> float:
        return self.after[-1][1] if self.after else self.candidates


@dataclass
class RoundEstimate:
    """The plan of a whole round."""

    pool_snippets: int
    pool_basis: str  # how pool_snippets was obtained
    reference_rows: int
    stages: list[StageEstimate]
    bootstrap_hours: float

    @property
    def release(self) -> StageEstimate:
        return next(s for s in self.stages if s.label == "release")

    @property
    def device_hours(self) -> float:
        return self.bootstrap_hours + sum(sum(s.hours.values()) for s in self.stages)


def pool_size(cfg: RunConfig) -> tuple[int, str]:
    """Kept seed snippets the pool is expected to hold, and how that number was obtained."""
    pc = cfg.plan
    if pc.pool_snippets is not None:
        return pc.pool_snippets, "plan.pool_snippets"
    if pc.source_rows is not None:
        est = pc.snippets_per_source_row
        n = int(pc.source_rows * est.value)
        return n, f"plan.source_rows {pc.source_rows:,} x {est.value:g} snippets per row ({est.basis})"
    if not cfg.pool.sources:
        return pc.stdlib_snippets, "the stdlib pool's measured count (plan.stdlib_snippets)"
    raise ConfigError(
        "plan: the pool's size is unknown for pool.sources "
        f"{cfg.pool.sources}: set plan.pool_snippets (a built pool's kept rows) or plan.source_rows"
    )


def seed_windows(cfg: RunConfig) -> list[tuple[str, int, int | None]]:
    """(label, first kept snippet, seeds asked for or None = all the rest) of each sample stage of a round."""
    rc = cfg.round
    out: list[tuple[str, int, int | None]] = [
        (f"iteration {t}", first_snippet(cfg, t), rc.snippets_per_iteration) for t in range(1, rc.iterations + 1)
    ]
    out.append(("release", first_snippet(cfg, rc.iterations + 1), rc.synthesize_snippets))
    if rc.probe_snippets:
        out.append(("probe", probe_first_snippet(cfg), rc.probe_snippets))
    return out


def stage_name(label: str) -> str:
    """The name the round flow gives a stage's sample step ('iteration 1: sample', 'synthesize: sample')."""
    return "synthesize: sample" if label == "release" else f"{label}: sample"  # 'probe: sample' too


def check_pool_feeds(cfg: RunConfig, kept_snippets: int) -> list[str]:
    """The shortfall of every stage that the pool (`kept_snippets` kept rows) cannot feed, as one line each.
    Raises PoolTooSmallError on the first one unless round.seed_shortfall is 'warn' (then returns the lines)."""
    lines = []
    for label, first, asked in seed_windows(cfg):
        got = max(0, kept_snippets - first) if asked is None else max(0, min(asked, kept_snippets - first))
        if asked is None and got == 0 or asked is not None and got < asked:
            want = "the rest of the" if asked is None else f"{asked:,}"
            short = f"short by {asked - got:,}" if asked is not None else "none left"
            line = (
                f"{stage_name(label)}: the pool cannot feed it: asks for {want} seed snippets from kept snippet "
                f"#{first:,}, the pool has {kept_snippets:,} ({short}); grow pool.sources or lower "
                "round.snippets_per_iteration / round.synthesize_snippets"
            )
            if cfg.round.seed_shortfall == "error":
                raise PoolTooSmallError(line)
            lines.append(line)
    return lines


def expected_top_k(candidates: int, p: float, top_k: int | None) -> float:
    """E[min(top_k, Binomial(candidates, p))]: rows a per-seed top-k keeps (top_k None = every survivor)."""
    p = min(max(p, 0.0), 1.0)
    if top_k is None or top_k >= candidates:
        return candidates * p
    # E[min(k, X)] = sum_{j=1..k} P(X >= j)
    pmf = [math.comb(candidates, i) * p**i * (1 - p) ** (candidates - i) for i in range(candidates + 1)]
    return sum(sum(pmf[j:]) for j in range(1, top_k + 1))


def _hours(work: float, rate: PlanEstimate) -> float:
    return work / rate.value / 3600 if rate.value > 0 else math.inf


def estimate_round(cfg: RunConfig, reference_rows: int) -> RoundEstimate:
    """The plan of a round (see the module doc). `reference_rows`: rows of R (its held-out share is left out of
    training). Raises PoolTooSmallError when the pool cannot feed a stage (round.seed_shortfall: error)."""
    pc, rc = cfg.plan, cfg.round
    pool, basis = pool_size(cfg)
    check_pool_feeds(cfg, pool)
    r_train = reference_rows - math.floor(reference_rows * rc.holdout_fraction)
    ckpts = cfg.train.num_checkpoints if rc.multi_checkpoint else 1
    per_seed = ckpts * cfg.sample.generation.samples_per_prompt
    p_sample = pc.format_rate.value
    if cfg.sample.execute and cfg.sample.require_passing_asserts:
        p_sample *= pc.asserts_pass_rate.value
    judge_aspects = sum(1 for a in cfg.score.aspects if a.kind == "judge")
    epochs = cfg.train.epochs
    bootstrap_h = _hours(r_train * epochs * pc.train_row_tokens.value, pc.train_tokens_per_s)
    stages: list[StageEstimate] = []
    kept_so_far = 0.0
    for label, first, asked in seed_windows(cfg):
        release = label == "release"
        seeds = max(0, pool - first) if asked is None else max(0, min(asked, pool - first))
        st = StageEstimate(label, first, asked, seeds, float(seeds * per_seed))
        if label == "probe":  # the base model (compare_base), the bootstrap and each iteration's synthesizer
            models = (rc.iterations + 1) * ckpts + (1 if rc.compare_base else 0)
            st.candidates = float(seeds * models * cfg.sample.generation.samples_per_prompt)
        st.hours["sample"] = _hours(st.candidates * pc.answer_tokens.value, pc.sample_tokens_per_s)
        if label == "probe":  # sampling only: no filter, no training
            stages.append(st)
            continue
        passed = st.candidates * p_sample
        st.after.append(("sample checks", passed))
        if rc.use_scorer:
            st.hours["score"] = _hours(passed * judge_aspects, pc.judge_passes_per_s)
            q = p_sample * pc.min_score_pass_rate.value
            top_k = rc.release_top_k_per_seed if release else cfg.score.top_k_per_seed
            st.after.append(("score", seeds * expected_top_k(per_seed, q, top_k)))
        if rc.use_influence and (not release or rc.release_influence):
            rows_in = st.rows_out
            st.hours["influence"] = _hours(rows_in * ckpts, pc.influence_rows_per_s)
            st.after.append(("influence", float(math.ceil(cfg.influence.keep_fraction * rows_in - 1e-9))))
        if release and rc.release_dedup:
            st.after.append(("dedup", st.rows_out * pc.distinct_problem_rate.value))
        if not release:
            earlier = kept_so_far if rc.accumulate_kept else 0.0
            st.train_rows = r_train + earlier + st.rows_out
            kept_so_far += st.rows_out
            st.hours["train"] = _hours(st.train_rows * epochs * pc.train_row_tokens.value, pc.train_tokens_per_s)
        stages.append(st)
    return RoundEstimate(pool, basis, reference_rows, stages, bootstrap_h)


def assumptions(cfg: RunConfig) -> list[tuple[str, PlanEstimate]]:
    """The plan section's rates and throughputs, by field name (for the printout)."""
    return [(name, value) for name, value in cfg.plan if isinstance(value, PlanEstimate)]


def plan_lines(cfg: RunConfig, est: RoundEstimate) -> list[str]:
    """The plan as plain text lines: pool, per stage seeds/candidates/rows after each filter/hours, totals."""
    lines = [
        f"pool: {est.pool_snippets:,} kept seed snippets ({est.pool_basis}); R: {est.reference_rows:,} rows",
        f"bootstrap: train on R, {est.bootstrap_hours:.2f} device-hours",
    ]
    for st in est.stages:
        asked = "all the rest" if st.requested is None else f"{st.requested:,}"
        rows = ", ".join(f"after {name} {n:,.0f}" for name, n in st.after)
        hours = ", ".join(f"{k} {v:.2f}" for k, v in st.hours.items())
        train = f"; trains on {st.train_rows:,.0f} rows" if st.train_rows else ""
        lines.append(
            f"{st.label}: seeds {st.seeds:,} (asked {asked}, from #{st.first:,}); candidates {st.candidates:,.0f}"
            f"{'; ' + rows if rows else ''}{train}; device-hours: {hours}"
        )
    lines.append(f"released dataset: {est.release.rows_out:,.0f} rows expected")
    lines.append(f"total: {est.device_hours:.1f} device-hours (one device; stages run one after another)")
    lines.append("assumptions (plan section):")
    for name, e in assumptions(cfg):
        lines.append(f"  {name} = {e.value:g} [{e.basis}] {e.note}")
    return lines


def plan_record(est: RoundEstimate) -> dict[str, Any]:
    """The plan as JSON-ready numbers (tests, a data card)."""
    return {
        "pool_snippets": est.pool_snippets,
        "release_rows": round(est.release.rows_out),
        "device_hours": round(est.device_hours, 2),
        "stages": [
            {
                "stage": s.label,
                "seeds": s.seeds,
                "candidates": round(s.candidates),
                "after": {k: round(v) for k, v in s.after},
                "train_rows": round(s.train_rows),
                "hours": {k: round(v, 3) for k, v in s.hours.items()},
            }
            for s in est.stages
        ],
    }
