"""synth_core.problem_dedup: near-duplicate problems among generated rows, the release's last filter."""

from __future__ import annotations

import pyarrow as pa
from conftest import write_samples

from synth_core.problem_dedup import DUPLICATE_PROBLEM, dedup_problems, rank_key
from synth_core.storage import commit_dataset, compute_funnel, read_dataset, read_manifest, write_part

CODE = "```python\ndef f(x):\n    return x\n\nassert f(1) == 1\n```"
PROBLEM = (
    "Write a function `merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]` that merges every "
    "pair of overlapping intervals and returns the merged intervals sorted by their start."
)


def _scored(tmp_path, rows: list[dict], scores: list[float | None]) -> str:
    """A score-stage-like dataset: the samples of `rows` with a `score` column."""
    samples = read_dataset(write_samples(str(tmp_path / "samples"), rows))
    table = samples.append_column("score", pa.array(scores, pa.float64()))
    uri = str(tmp_path / "scored")
    part = write_part(uri, 0, table, "fp-scored", compute_funnel(table))
    commit_dataset(uri, [part], table.schema, "fp-scored", stage="score", funnel=part.funnel)
    return uri


def test_the_best_scored_row_of_each_duplicate_group_stays(cfg, tmp_path):
    rows = [
        {"snippet": "a = 1\n", "instruction": PROBLEM, "response": CODE},
        {"snippet": "b = 2\n", "instruction": PROBLEM.replace("sorted by", "in order of"), "response": CODE},
        {"snippet": "c = 3\n", "instruction": PROBLEM + "\n", "response": CODE + "\n"},  # the same once normalised
        {"snippet": "d = 4\n", "instruction": "Write a function `is_even(n: int) -> bool` for n.", "response": CODE},
        {"snippet": "e = 5\n", "instruction": PROBLEM, "response": CODE, "reject_reason": "asserts_failed"},
    ]
    # write_samples orders rows by snippet_id: the scores follow the rows, whatever that order is.
    by_snippet = {r["snippet"]: s for r, s in zip(rows, [5.0, 7.5, 6.0, 1.0, 9.0], strict=True)}
    table = read_dataset(write_samples(str(tmp_path / "order"), rows))
    scores = [by_snippet[s] for s in table.column("snippet").to_pylist()]
    uri = dedup_problems(_scored(tmp_path, rows, scores), cfg)
    out = {r["snippet"]: r for r in read_dataset(uri).to_pylist()}
    best = out["b = 2\n"]  # 7.5: the best kept row of the three near-identical problems
    assert best["reject_reason"] is None and best["duplicate_of"] is None
    for s in ("a = 1\n", "c = 3\n"):
        assert out[s]["reject_reason"] == DUPLICATE_PROBLEM and out[s]["duplicate_of"] == best["sample_id"]
        assert out[s]["duplicate_similarity"] >= cfg.dedup.threshold
    assert out["d = 4\n"]["reject_reason"] is None  # a different problem
    # A row rejected earlier keeps its reason and is not compared (its 9.0 does not make it the kept one).
    assert out["e = 5\n"]["reject_reason"] == "asserts_failed" and out["e = 5\n"]["duplicate_of"] is None
    m = read_manifest(uri)
    assert m.funnel["rejected"] == {"asserts_failed": 1, DUPLICATE_PROBLEM: 2} and m.stats["duplicates"] == 2
    assert "score" in m.arrow().names and m.arrow().field("duplicate_similarity").type == pa.float64()
    assert dedup_problems(_scored(tmp_path, rows, scores), cfg) == uri  # content-addressed: a re-run is free


def test_rank_prefers_score_then_influence_then_sample_id():
    rows = [
        {"sample_id": "b", "score": None, "influence": 0.9},
        {"sample_id": "c", "score": 3.0, "influence": None},
        {"sample_id": "a", "score": 3.0, "influence": 0.1},
        {"sample_id": "d", "score": None, "influence": None},
    ]
    assert [r["sample_id"] for r in sorted(rows, key=rank_key)] == ["a", "c", "b", "d"]
