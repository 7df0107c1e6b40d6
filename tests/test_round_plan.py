"""synth_core.round_plan: the seed-snippet windows of a round's iterations, and dated (nightly) rounds."""

from __future__ import annotations

import datetime

import pytest

from synth_core.config import ConfigError, RunConfig
from synth_core.reference import BUILTIN_REFERENCE
from synth_core.round_plan import (
    EPOCH,
    dated_config,
    first_snippet,
    parse_run_date,
    snippets_per_round,
    training_data,
)


def _cfg(**round_) -> RunConfig:
    return RunConfig.model_validate({"round": {"iterations": 2, "snippets_per_iteration": 8, **round_}})


def test_iterations_and_release_take_consecutive_windows():
    cfg = _cfg(synthesize_snippets=5, first_snippet=3)
    assert [first_snippet(cfg, t) for t in (1, 2, 3)] == [3, 11, 19]
    assert snippets_per_round(cfg) == 21
    assert snippets_per_round(_cfg(synthesize_snippets=None)) is None


def test_dated_rounds_move_along_the_pool_and_reseed_sampling():
    cfg = _cfg(synthesize_snippets=5)
    day = EPOCH + datetime.timedelta(days=10)
    a, again, b = (dated_config(cfg, d, 1000) for d in (day, day, day + datetime.timedelta(days=1)))
    assert a.model_dump() == again.model_dump(), "a re-run of the same night must be the same round"
    assert (a.round.first_snippet, b.round.first_snippet) == (210, 231), "one window of 21 snippets per night"
    assert a.sample.generation.seed != b.sample.generation.seed != cfg.sample.generation.seed
    # What keeps nights comparable and the bootstrap shared stays as configured.
    for key in ("train", "influence", "models"):
        assert getattr(a, key) == getattr(cfg, key)
    assert a.round.seed == cfg.round.seed and a.round.holdout_fraction == cfg.round.holdout_fraction
    # The window wraps around a small pool and never runs past its end.
    wrapped = [dated_config(cfg, EPOCH + datetime.timedelta(days=d), 50).round.first_snippet for d in range(8)]
    assert all(0 <= f <= 50 - 21 for f in wrapped) and len(set(wrapped)) > 1
    # A pool smaller than one round: every night uses all of it, with new samples.
    assert dated_config(cfg, day, 20).round.first_snippet == 0


def test_run_dates():
    assert parse_run_date("2026-11-26") == datetime.date(2026, 11, 26)
    assert parse_run_date("today") == datetime.datetime.now(datetime.UTC).date()
    sched = datetime.datetime(2026, 11, 26, 1, 0, tzinfo=datetime.UTC)
    assert parse_run_date("scheduled", sched) == datetime.date(2026, 11, 26)
    with pytest.raises(ConfigError, match="expected YYYY-MM-DD"):
        parse_run_date("26/11/2026")
    with pytest.raises(ConfigError, match="scheduled flow run"):
        parse_run_date("scheduled")


def test_training_data_accumulates_earlier_kept_rows_only_when_asked():
    cfg = _cfg(synthesize_snippets=5)
    assert not cfg.round.accumulate_kept  # the default: R + this iteration's kept rows
    assert training_data(cfg, "r.jsonl", "kept-2", ["kept-1"]) == ["r.jsonl", "kept-2"]
    cfg.round.accumulate_kept = True
    assert training_data(cfg, "r.jsonl", "kept-3", ["kept-1", "kept-2"]) == ["r.jsonl", "kept-1", "kept-2", "kept-3"]
    assert training_data(cfg, None, "kept-1", []) == [BUILTIN_REFERENCE, "kept-1"]


def test_the_release_keeps_every_passing_candidate_unless_told_otherwise(tmp_path):
    """round.release_top_k_per_seed is the release's score.top_k_per_seed (None = all that passed the filters); the
    iterations keep score.top_k_per_seed (one per seed picks what training sees)."""
    import pyarrow as pa

    from synth_core.round_plan import stage_config
    from synth_core.schema import CHECKPOINT_SCHEMA
    from synth_core.storage import commit_dataset, write_part

    out = str(tmp_path / "train")
    row = {"checkpoint": str(tmp_path / "ckpt-1"), "step": 1, "mean_lr": 1e-3, "span_steps": 1, "method": "lora"}
    table = pa.Table.from_pylist([row | {"base": "builtin:x", "reject_reason": None}], schema=CHECKPOINT_SCHEMA)
    commit_dataset(out, [write_part(out, 0, table, "fp")], CHECKPOINT_SCHEMA, "fp", stage="train")
    cfg = _cfg()
    assert cfg.score.top_k_per_seed == 1 and cfg.round.release_top_k_per_seed is None
    assert stage_config(cfg, out, 2).score.top_k_per_seed == 1
    assert stage_config(cfg, out, 3).score.top_k_per_seed is None
    assert stage_config(_cfg(release_top_k_per_seed=2), out, 3).score.top_k_per_seed == 2
