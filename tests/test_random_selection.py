"""The random-selection ablation: as many rows as the filters kept, a seeded choice among the rows the filters may
keep (parsing, executable), every other row kept with its reason."""

from __future__ import annotations

from conftest import write_samples

from synth_core.random_selection import DROPPED, choose_random, select_random
from synth_core.storage import read_dataset, read_manifest


def _candidates(reasons: list[str | None]) -> list[dict]:
    return [
        {
            "snippet": f"x = {i}\n",
            "instruction": f"Problem {i}",
            "response": f"Answer {i}:\n```python\nx = {i}\nassert x == {i}\n```",
            "reject_reason": r,
            "exec_status": "passed" if r is None else None,
        }
        for i, r in enumerate(reasons)
    ]


def test_random_selection_keeps_the_filters_count_seeded(cfg, tmp_path):
    parsed_or_not = [None] * 6 + ["no_code_block", "empty_output"]
    samples = write_samples(str(tmp_path / "samples"), _candidates(parsed_or_not))
    # The "filters" kept 3 of the 6 parsed rows (the first three).
    filtered = write_samples(str(tmp_path / "filtered"), _candidates([None] * 3 + ["score_below_min"] * 3))
    out = select_random(samples, filtered, seed=0, storage=cfg.storage)

    m = read_manifest(out, cfg.storage)
    assert m.stage == "random_selection" and m.funnel["kept"] == 3 and m.num_rows == 8
    assert m.funnel["rejected"] == {DROPPED: 3, "empty_output": 1, "no_code_block": 1}
    rows = read_dataset(out, storage=cfg.storage).to_pylist()
    src = {r["sample_id"]: r for r in read_dataset(samples, storage=cfg.storage).to_pylist()}
    kept = [r["sample_id"] for r in rows if r["reject_reason"] is None]
    assert all(src[i]["reject_reason"] is None for i in kept)  # drawn among the parsed rows only
    for r in rows:  # what the sample stage rejected keeps its own reason
        if src[r["sample_id"]]["reject_reason"] is not None:
            assert r["reject_reason"] == src[r["sample_id"]]["reject_reason"]
    assert read_dataset(out, kept_only=True, storage=cfg.storage).num_rows == 3

    # Seeded: the same seed gives the same dataset (a free re-run), other seeds other choices of the same size.
    assert select_random(samples, filtered, seed=0, storage=cfg.storage) == out
    assert read_manifest(out, cfg.storage).created_at == m.created_at
    parsed = [i for i, r in src.items() if r["reject_reason"] is None]
    choices = {frozenset(choose_random(parsed, 3, seed)) for seed in range(6)}
    assert len(choices) > 1 and all(len(c) == 3 for c in choices)
    assert choose_random(parsed, 3, 0) == choose_random(list(reversed(parsed)), 3, 0) == set(kept)
    other = select_random(samples, filtered, seed=1, storage=cfg.storage)
    assert other != out and read_manifest(other, cfg.storage).funnel["kept"] == 3


def test_random_selection_draws_only_among_rows_the_filters_may_keep(cfg, tmp_path):
    """Rows the sample stage kept whose code does not parse, whose solution is empty or whose asserts failed in the
    sandbox are never drawn (the filters never keep them either), and say why (issue 19)."""
    cands = _candidates([None] * 7)
    cands[4]["response"] = "Answer:\n```python\ndef f(:\n```"  # kept upstream (screen off), does not parse
    cands[5]["response"] = "   "
    cands[6]["exec_status"] = "failed"
    samples = write_samples(str(tmp_path / "samples"), cands)
    filtered = write_samples(str(tmp_path / "filtered"), _candidates([None] * 4 + ["score_below_threshold"] * 3))
    out = select_random(samples, filtered, seed=0, storage=cfg.storage)
    by_response = {r["response"]: r for r in read_dataset(out, storage=cfg.storage).to_pylist()}
    assert by_response[cands[4]["response"]]["reject_reason"] == "code_does_not_parse"
    assert by_response[cands[5]["response"]]["reject_reason"] == "empty_response"
    assert by_response[cands[6]["response"]]["reject_reason"] == "asserts_failed"
    # The four eligible rows are exactly the four the filters' count asks for: all drawn, whatever the seed.
    kept = {r["response"] for r in by_response.values() if r["reject_reason"] is None}
    assert kept == {c["response"] for c in cands[:4]}
    assert read_manifest(out, cfg.storage).stats["eligible"] == 4
