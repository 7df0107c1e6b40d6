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
    probe_config,
    probe_first_snippet,
    probe_synthesizers,
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


def test_the_probe_takes_the_window_after_the_release():
    cfg = _cfg(synthesize_snippets=5, first_snippet=3, probe_snippets=4)
    assert probe_first_snippet(cfg) == 3 + 2 * 8 + 5
    assert snippets_per_round(cfg) == 2 * 8 + 5 + 4  # a dated round moves the probe's seeds along with the rest
    with pytest.raises(ConfigError, match="round.probe_snippets needs round.synthesize_snippets"):
        probe_first_snippet(_cfg(synthesize_snippets=None, probe_snippets=4))


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


def _train_output(tmp_path, name: str, checkpoints: int = 2, lora_of: str | None = None, seed: int = 0) -> str:
    """A finished train output listing `checkpoints` checkpoint folders: random LoRA adapters on `lora_of` (seeded by
    `seed` and their index), or only references without it."""
    import pyarrow as pa

    from synth_core.models import build_random_lora
    from synth_core.schema import CHECKPOINT_SCHEMA
    from synth_core.storage import commit_dataset, write_part

    out = str(tmp_path / name)
    rows = [
        {"checkpoint": f"{out}/ckpt-{i}", "step": i, "mean_lr": 1e-3, "span_steps": 1, "method": "lora"}
        | {"base": "builtin:x", "reject_reason": None}
        for i in range(1, checkpoints + 1)
    ]
    for i, r in enumerate(rows):
        if lora_of:
            build_random_lora(lora_of, r["checkpoint"], rank=4, seed=seed + i)
    table = pa.Table.from_pylist(rows, schema=CHECKPOINT_SCHEMA)
    commit_dataset(out, [write_part(out, 0, table, "fp")], CHECKPOINT_SCHEMA, "fp", stage="train")
    return out


def test_the_probe_samples_every_synthesizer_in_one_stage(tmp_path, tiny_model):
    """probe_synthesizers: the base model (with compare_base), the bootstrap and each iteration, with their
    checkpoints (the last only without multi_checkpoint); probe_config: all of them in one sample stage, where a
    synthesizer with the bootstrap's weights (an iteration that kept nothing trains on R alone) is sampled once."""
    boot, it1 = (_train_output(tmp_path, n, lora_of=tiny_model, seed=s) for n, s in (("boot", 0), ("it1", 10)))
    it2 = _train_output(tmp_path, "it2", lora_of=tiny_model, seed=0)  # the bootstrap's weights again
    cfg = _cfg(synthesize_snippets=5, probe_snippets=4)
    groups = probe_synthesizers(cfg, [boot, it1, it2], base=True)
    assert [g[0] for g in groups] == ["base model", "bootstrap", "after iteration 1", "after iteration 2"]
    assert groups[0][1] == [cfg.models.synthesizer] and groups[2][1] == [f"{it1}/ckpt-1", f"{it1}/ckpt-2"]
    cfg.models.synthesizer = tiny_model
    groups[0] = ("base model", [tiny_model])
    pcfg, sampled = probe_config(cfg, groups)
    assert pcfg.sample.checkpoints == [tiny_model, *groups[1][1], *groups[2][1]]
    assert sampled[:3] == groups[:3] and sampled[3] == ("after iteration 2", groups[1][1])
    assert (pcfg.sample.first_snippet, pcfg.sample.max_snippets, pcfg.sample.iteration) == (21, 4, 0)
    single = probe_synthesizers(_cfg(multi_checkpoint=False), [boot, it1])
    assert single == [("bootstrap", [f"{boot}/ckpt-2"]), ("after iteration 1", [f"{it1}/ckpt-2"])]


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
