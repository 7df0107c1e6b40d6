"""Exact and near deduplication of snippets with datasketch MinHash LSH.

Signatures: 5-token shingles (configurable) hashed with xxh32 and permuted by datasketch's
`MinHash.generator` with ONE shared permutation table. `bench/pool.py` measures it against the usual
per-document `MinHash` + `update`-per-shingle loop with the same hash function (bit-identical
signatures, hence the same pairs): about 7x end to end on 2 cores, 11.6x for the MinHash part alone
(shingling is shared by both and costs about 21 us per snippet). A numpy `minimum.reduceat` over all
documents at once was measured 3x SLOWER than the generator here, so it is not used.

Dedup: rows are visited in a fixed order (the order of the input); the first of a group is kept.
Exact duplicates share the normalised-content id; a near duplicate is a row whose estimated Jaccard
similarity to an already kept row (LSH candidate, verified on the full signature) is at least the
threshold. A removed row names the kept row (`duplicate_of`) and the similarity.

Signatures are computed per ingest shard (`compute_signatures`), dedup itself is global
(`find_duplicates`): it needs every signature, and LSH over 10^5 rows takes seconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from synth_core.config import DedupConfig
from synth_core.text import token_ngrams, tokenize_code

EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"


def _hashfunc():
    import xxhash

    return xxhash.xxh32_intdigest


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int):
    """datasketch's own permutation table for (num_perm, seed), built once and shared by all rows."""
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=seed, hashfunc=_hashfunc(), scheme="affine32").permutations


def shingle_set(text: str, shingle_size: int) -> list[bytes]:
    """The distinct token shingles of a text, as bytes (datasketch hashes bytes)."""
    return [s.encode("utf-8") for s in set(token_ngrams(tokenize_code(text), shingle_size))]


def compute_signatures(texts: Sequence[str], cfg: DedupConfig) -> np.ndarray:
    """MinHash signatures of texts. Returns `[len(texts), num_perm] uint32`."""
    from datasketch import MinHash

    out = np.empty((len(texts), cfg.num_perm), dtype=np.uint32)
    gen = MinHash.generator(
        (shingle_set(t, cfg.shingle_size) for t in texts),
        num_perm=cfg.num_perm,
        seed=cfg.seed,
        hashfunc=_hashfunc(),
        permutations=_permutations(cfg.num_perm, cfg.seed),
        scheme="affine32",
    )
    for i, m in enumerate(gen):
        out[i] = m.hashvalues
    return out


def compute_signatures_loop(texts: Sequence[str], cfg: DedupConfig) -> np.ndarray:
    """The baseline: one MinHash per text, one `update` per shingle (what most scripts do).

    Kept for the benchmark and for the test that both give identical signatures.
    """
    from datasketch import MinHash

    out = np.empty((len(texts), cfg.num_perm), dtype=np.uint32)
    for i, t in enumerate(texts):
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, hashfunc=_hashfunc(), scheme="affine32")
        for s in shingle_set(t, cfg.shingle_size):
            m.update(s)
        out[i] = m.hashvalues
    return out


@dataclass
class Duplicate:
    """Why a row was removed: which kept row it duplicates, and how similar they are."""

    reason: str
    duplicate_of: str
    index_of: int
    similarity: float


def find_duplicates(
    ids: Sequence[str],
    signatures: np.ndarray | None,
    cfg: DedupConfig,
    skip: Iterable[bool] | None = None,
) -> list[Duplicate | None]:
    """For each row, None if kept or the Duplicate that removes it.

    `ids`: normalised-content ids, `[n]`; `signatures`: `[n, num_perm] uint32` (None when near dedup
    is off); `skip`: rows already rejected upstream, neither kept nor compared.
    """
    n = len(ids)
    result: list[Duplicate | None] = [None] * n
    skipped = list(skip) if skip is not None else [False] * n
    # id -> the kept row it is (int), or the Duplicate that removed its first occurrence: a later exact
    # copy of a removed row is removed the same way and names the same KEPT row.
    first_by_id: dict[str, int | Duplicate] = {}
    lsh = None
    if cfg.near:
        if signatures is None:
            raise ValueError("near dedup needs signatures")
        from datasketch import LeanMinHash, MinHashLSH

        lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    for i in range(n):
        if skipped[i]:
            continue
        if cfg.exact:
            seen = first_by_id.get(ids[i])
            if isinstance(seen, int):
                result[i] = Duplicate(EXACT_DUPLICATE, ids[seen], seen, 1.0)
                continue
            if seen is not None:
                result[i] = Duplicate(seen.reason, seen.duplicate_of, seen.index_of, seen.similarity)
                continue
        if lsh is not None:
            sig = signatures[i]
            lean = LeanMinHash(seed=cfg.seed, hashvalues=sig, scheme="affine32")
            best, best_sim = -1, 0.0
            for key in lsh.query(lean):
                sim = float(np.count_nonzero(signatures[key] == sig)) / cfg.num_perm
                if sim >= cfg.threshold and (sim > best_sim or (sim == best_sim and key < best)):
                    best, best_sim = key, sim
            if best >= 0:
                result[i] = Duplicate(NEAR_DUPLICATE, ids[best], best, best_sim)
                if cfg.exact:
                    first_by_id[ids[i]] = result[i]
                continue
            lsh.insert(i, lean, check_duplication=False)
        if cfg.exact:
            first_by_id[ids[i]] = i
    return result


def text_duplicates(texts: Sequence[str], cfg: DedupConfig) -> list[Duplicate | None]:
    """find_duplicates over free texts (generated problems): each text's id is the content id of its normalised form
    (exact dedup), and its MinHash signature is taken of the text as given (near dedup), in order; the first of a
    group is kept. For the pool's rows, see the pool stage."""
    from synth_core.schema import content_id
    from synth_core.text import normalize_snippet

    sigs = compute_signatures(list(texts), cfg) if cfg.near else None
    return find_duplicates([content_id(normalize_snippet(t)) for t in texts], sigs, cfg)
