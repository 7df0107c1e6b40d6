"""Near-duplicate problems among generated rows: the release's last filter (round.release_dedup).

The pool is deduplicated, but a synthesizer writes the same problem again from neighbouring seeds and, with several
checkpoints and samples per seed, from one seed: the evidence round's release had 4% of its problems near
duplicates of another (git 6e69122), its 135M synthesizer's later iterations 7%. A student trained on the release
would see those problems twice. This stage keeps the best row of each group of near-duplicate problems (by the
judge's overall score, then influence, then sample_id: deterministic) and rejects the others with reason
`duplicate_problem`, naming the kept row (`duplicate_of`, its sample_id) and the estimated Jaccard similarity of
their problem statements.

Same method and settings as the pool's near dedup (synth_core.dedup: word 5-gram shingles, MinHash LSH, the `dedup`
section's threshold and permutations), on the normalised problem statement; the solution is not compared (two
solutions of one problem are still one problem). The output holds every row of its input, reject reasons of
earlier stages untouched; its location derives from the input's fingerprint and the dedup settings, so a re-run
is free. Knows nothing of Prefect or of rounds (flows/round.py calls it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from synth_core.config import RunConfig

STAGE_VERSION = 1
DUPLICATE_PROBLEM = "duplicate_problem"


def rank_key(row: dict[str, Any]) -> tuple:
    """Which row of a duplicate group is kept: the highest overall score, then influence, then the smallest
    sample_id (rows without a score or influence rank after those with one)."""
    score, influence = row.get("score"), row.get("influence")
    return (score is None, -(score or 0.0), influence is None, -(influence or 0.0), row["sample_id"])


def find_duplicate_problems(rows: list[dict[str, Any]], cfg: RunConfig) -> dict[int, tuple[int, float]]:
    """Index of each kept row (reject_reason None) whose problem nearly duplicates a better kept row's -> (index of
    that row, similarity). Rows already rejected are neither kept nor compared."""
    from synth_core.dedup import text_duplicates
    from synth_core.text import normalize_snippet

    order = sorted((i for i, r in enumerate(rows) if r["reject_reason"] is None), key=lambda i: rank_key(rows[i]))
    # Signed in normalised form (normalize_snippet is idempotent, so the ids are the same either way).
    texts = [normalize_snippet(rows[i]["instruction"] or "") for i in order]
    if not texts:
        return {}
    dups = text_duplicates(texts, cfg.dedup)
    return {order[k]: (order[d.index_of], round(d.similarity, 4)) for k, d in enumerate(dups) if d is not None}


def dedup_problems(candidates: str, cfg: RunConfig, out: str | None = None) -> str:
    """Reject the near-duplicate problems among the kept rows of `candidates` (any filter's output: samples,
    scores, influence); returns the output's URI (default `<storage.root>/problem_dedup/<fingerprint>`), the
    input's schema plus `duplicate_of` and `duplicate_similarity`."""
    import pyarrow as pa

    from synth_core.schema import with_fields
    from synth_core.storage import (
        OnePart,
        compute_funnel,
        fingerprint,
        join_uri,
        read_dataset,
        read_manifest,
        write_one_part_dataset,
    )

    manifest = read_manifest(candidates, cfg.storage)
    settings = cfg.dedup.model_dump(mode="json")
    fp = fingerprint("problem_dedup", STAGE_VERSION, manifest.fingerprint, settings)
    out = out or join_uri(cfg.storage.root, "problem_dedup", fp)

    def build() -> OnePart:
        table = read_dataset(candidates, storage=cfg.storage)
        wanted = ("sample_id", "reject_reason", "instruction", "score", "influence")
        rows = table.select([c for c in wanted if c in table.schema.names]).to_pylist()
        dups = find_duplicate_problems(rows, cfg)
        reasons = [DUPLICATE_PROBLEM if i in dups else r["reject_reason"] for i, r in enumerate(rows)]
        of = [rows[dups[i][0]]["sample_id"] if i in dups else None for i in range(len(rows))]
        sim = [dups[i][1] if i in dups else None for i in range(len(rows))]
        col = table.schema.get_field_index("reject_reason")
        table = table.set_column(col, table.schema.field(col), pa.array(reasons, pa.string()))
        fields = [pa.field("duplicate_of", pa.string()), pa.field("duplicate_similarity", pa.float64())]
        schema = with_fields(manifest.arrow(), fields)
        # An input deduplicated before: this pass's verdict replaces its columns.
        table = table.drop_columns([f.name for f in fields if f.name in table.schema.names])
        for f, values in zip(fields, (of, sim), strict=True):
            table = table.append_column(f, pa.array(values, f.type))
        return OnePart(
            table.select(schema.names).cast(schema),
            schema=schema,
            funnel=compute_funnel(table),
            inputs=[candidates],
            config={"dedup": settings},
            stats={"compared": sum(r["reject_reason"] is None for r in rows), "duplicates": len(dups)},
            part_if_empty=False,
        )

    return write_one_part_dataset(out, fp, build, stage="problem_dedup", storage=cfg.storage)
