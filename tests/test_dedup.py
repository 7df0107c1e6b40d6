"""MinHash signatures (fast path == datasketch's per-document loop) and exact/near dedup decisions."""

from __future__ import annotations

import numpy as np

from synth_core.config import DedupConfig
from synth_core.dedup import (
    EXACT_DUPLICATE,
    NEAR_DUPLICATE,
    compute_signatures,
    compute_signatures_loop,
    find_duplicates,
)

BASE = "\n".join(f"def f{i}(x):\n    return x * {i} + sum(range({i}))" for i in range(8))


def test_fast_signatures_equal_the_per_document_loop():
    cfg = DedupConfig(num_perm=64)
    texts = [BASE, BASE.replace("sum", "max"), "x = 1", "", "import os\nprint(os.getcwd())"]
    fast = compute_signatures(texts, cfg)
    assert fast.shape == (5, 64) and fast.dtype == np.uint32
    assert np.array_equal(fast, compute_signatures_loop(texts, cfg))


def test_exact_and_near_duplicates_name_the_kept_row():
    cfg = DedupConfig()
    near = BASE.replace("f7(x)", "g7(x)")  # one token changed out of ~150
    texts = [BASE, "completely different text about parsing json files", BASE, near]
    ids = ["a", "b", "a", "c"]
    dups = find_duplicates(ids, compute_signatures(texts, cfg), cfg)
    assert dups[0] is None and dups[1] is None
    assert dups[2].reason == EXACT_DUPLICATE and dups[2].duplicate_of == "a" and dups[2].index_of == 0
    assert dups[3].reason == NEAR_DUPLICATE and dups[3].duplicate_of == "a" and dups[3].similarity >= 0.7


def test_skipped_rows_are_neither_kept_nor_compared():
    cfg = DedupConfig()
    texts = [BASE, BASE]
    dups = find_duplicates(["a", "a"], compute_signatures(texts, cfg), cfg, skip=[True, False])
    assert dups == [None, None]


def test_switches_turn_steps_off():
    sigs = compute_signatures([BASE, BASE], DedupConfig())
    assert find_duplicates(["a", "a"], sigs, DedupConfig(exact=False, near=False)) == [None, None]
    dups = find_duplicates(["a", "b"], sigs, DedupConfig(exact=True, near=False))
    assert dups == [None, None]


def test_exact_copy_of_a_removed_row_names_the_kept_row():
    cfg = DedupConfig()
    near = BASE.replace("f7(x)", "g7(x)")
    sigs = compute_signatures([BASE, near, near], cfg)
    dups = find_duplicates(["a", "b", "b"], sigs, cfg)
    assert dups[1].reason == NEAR_DUPLICATE and dups[1].duplicate_of == "a"
    # The third row is an exact copy of a removed row: it must name the kept row "a", not "b".
    assert dups[2].duplicate_of == "a" and dups[2].index_of == 0


def test_turning_near_dedup_on_after_a_run_without_it(tmp_path):
    from synth_core import pool
    from synth_core.config import RunConfig

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text(BASE)
    cfg = RunConfig()
    cfg.storage.root = str(tmp_path / "data")
    cfg.pool.sources = [str(src)]
    cfg.dedup.near = False
    pool.build_pool(cfg, str(tmp_path / "one"))
    cfg.dedup.near = True  # needs signatures the first ingest did not compute: a new ingest, no crash
    pool.build_pool(cfg, str(tmp_path / "two"))
