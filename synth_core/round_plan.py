"""How a round configures its stages: which checkpoints each iteration samples from and which seed snippets it takes.

Iteration t (1..T) samples `round.snippets_per_iteration` kept snippets starting after those of iterations 1..t-1,
the release takes the next `round.synthesize_snippets` and the probe (`probe_config`) the next `round.probe_snippets`,
so no seed is used twice in a round; a dated run (a
nightly schedule) moves that window along the pool and reseeds sampling by date (`dated_config`). Pure config
arithmetic, shared by the iteration and round flows (flows/iteration.py, flows/round.py), which only wire stages.
"""

from __future__ import annotations

import datetime
import hashlib

from synth_core.config import ConfigError, RunConfig
from synth_core.train import checkpoints_of

# Day 0 of dated runs: night N of a nightly schedule takes the N-th window of seed snippets (modulo the pool).
EPOCH = datetime.date(2025, 1, 1)


def first_snippet(cfg: RunConfig, iteration: int) -> int:
    """Kept snippets used before iteration `iteration` (T + 1 = the release)."""
    n = cfg.round.snippets_per_iteration
    return cfg.round.first_snippet + ((iteration - 1) * n if n else 0)


def snippets_per_round(cfg: RunConfig) -> int | None:
    """Seed snippets one round takes (its iterations' and the release's); None = every kept snippet."""
    rc = cfg.round
    if rc.synthesize_snippets is None or (rc.iterations and rc.snippets_per_iteration is None):
        return None
    return rc.iterations * (rc.snippets_per_iteration or 0) + rc.synthesize_snippets + rc.probe_snippets


def probe_first_snippet(cfg: RunConfig) -> int:
    """The probe's first seed snippet: right after the release's window (round.synthesize_snippets must be set)."""
    if cfg.round.synthesize_snippets is None:
        raise ConfigError(
            "round.probe_snippets needs round.synthesize_snippets: with None the release takes every kept snippet "
            "and no unused seed is left to probe"
        )
    return first_snippet(cfg, cfg.round.iterations + 1) + cfg.round.synthesize_snippets


def dated_config(cfg: RunConfig, date: datetime.date, kept_snippets: int) -> RunConfig:
    """The round of one date (a nightly run): new seed snippets and new samples each night, the same ones on a
    re-run of that night (so it resumes), from one unchanged config.

    - Seeds: the window of `snippets_per_round` kept snippets moves by one window per day since EPOCH, wrapping
      around the pool (`kept_snippets`, the pool's kept rows); consecutive nights share no seed until it wraps.
    - Samples: the generation seed is mixed with the date, so even a wrapped window gets new completions.
    What stays: the bootstrap (its inputs do not depend on the date, so every night reuses it), the held-out split
    of R and the projection seed (nights stay comparable), the training seed.
    """
    out = cfg.model_copy(deep=True)
    day = (date - EPOCH).days
    window = snippets_per_round(cfg)
    if window and kept_snippets > window:
        out.round.first_snippet = (cfg.round.first_snippet + day * window) % (kept_snippets - window + 1)
    digest = hashlib.sha256(f"{cfg.sample.generation.seed}:{date.isoformat()}".encode()).digest()
    out.sample.generation.seed = int.from_bytes(digest[:4], "little")
    return out


def parse_run_date(value: str, scheduled: datetime.datetime | None = None) -> datetime.date:
    """A run date: YYYY-MM-DD, 'today' (UTC), or 'scheduled' (the flow run's scheduled start; `scheduled`)."""
    if value == "today":
        return datetime.datetime.now(datetime.UTC).date()
    if value == "scheduled":
        if scheduled is None:
            raise ConfigError("run date 'scheduled' needs a scheduled flow run (a deployment's run)")
        return scheduled.date()
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"run date {value!r}: expected YYYY-MM-DD, 'today' or 'scheduled'") from None


def training_data(
    cfg: RunConfig, reference: str | None, kept: str, earlier_kept: list[str] | None = None
) -> list[str]:
    """What iteration t trains on: R and its kept rows, plus (round.accumulate_kept) the kept rows of iterations
    1..t-1 (`earlier_kept`, in order). Each iteration trains from the base model either way."""
    from synth_core.reference import BUILTIN_REFERENCE

    earlier = list(earlier_kept or []) if cfg.round.accumulate_kept else []
    return [reference or BUILTIN_REFERENCE, *earlier, kept]


def stage_config(cfg: RunConfig, checkpoints: str, iteration: int) -> RunConfig:
    """The config of iteration `iteration`'s stages (T + 1 = the release's): sample from the checkpoints of the
    train output `checkpoints` (only its last one when round.multi_checkpoint is off) on this iteration's seeds."""
    ckpts = checkpoints_of(checkpoints, cfg)
    release = iteration > cfg.round.iterations
    out = cfg.model_copy(deep=True)
    out.sample.checkpoints = ckpts if cfg.round.multi_checkpoint else ckpts[-1:]
    out.sample.base = None
    out.sample.iteration = iteration
    out.sample.max_snippets = cfg.round.synthesize_snippets if release else cfg.round.snippets_per_iteration
    out.sample.first_snippet = first_snippet(cfg, iteration)
    if release and not cfg.round.release_influence:
        out.round.use_influence = False
    if release:  # a release wants every row that passed; one per seed capped the demo's at its 16 seeds
        out.score.top_k_per_seed = cfg.round.release_top_k_per_seed
    return out


def probe_synthesizers(cfg: RunConfig, train_outputs: list[str], base: bool = False) -> list[tuple[str, list[str]]]:
    """(label, checkpoint refs) of each synthesizer the probe compares: the base synthesizer when `base`, then the
    bootstrap (train_outputs[0]) and each iteration's train output, with all its checkpoints (only the last one
    when round.multi_checkpoint is off, as the iterations sample)."""
    groups = [("base model", [cfg.models.synthesizer])] if base else []
    for t, train_out in enumerate(train_outputs):
        own = checkpoints_of(train_out, cfg)
        label = "bootstrap" if t == 0 else f"after iteration {t}"
        groups.append((label, own if cfg.round.multi_checkpoint else own[-1:]))
    return groups


def probe_config(
    cfg: RunConfig, synthesizers: list[tuple[str, list[str]]]
) -> tuple[RunConfig, list[tuple[str, list[str]]]]:
    """The probe's sample config: every checkpoint of `synthesizers` (probe_synthesizers) in ONE sample stage (one
    engine: vLLM serves the adapters and their base together) on the `round.probe_snippets` seeds after the
    release's; lineage iteration 0 (the probe trains nothing). A checkpoint with the same weights as an earlier one
    (an iteration that kept no row trains on R alone, as the bootstrap did) is sampled once: the returned groups
    name the checkpoint whose rows stand for it."""
    from synth_core.models import resolve_model

    first: dict[str, str] = {}  # weights' fingerprint -> the first checkpoint with them
    groups = []
    for label, refs in synthesizers:
        fps = [resolve_model(r, base=cfg.sample.base, storage=cfg.storage).fingerprint for r in refs]
        groups.append((label, [first.setdefault(fp, ref) for fp, ref in zip(fps, refs, strict=True)]))
    out = cfg.model_copy(deep=True)
    out.sample.checkpoints = list(first.values())
    out.sample.iteration = 0
    out.sample.max_snippets = cfg.round.probe_snippets
    out.sample.first_snippet = probe_first_snippet(cfg)
    return out, groups
