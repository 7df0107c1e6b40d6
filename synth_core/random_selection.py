"""The "random selection of the same size" ablation (issue 8): keep as many candidates as the filters kept, but
chosen at random among the candidates the filters choose from.

It asks whether the scorer and the influence filter choose better rows than chance: with `round.random_selection`
on, an iteration still runs its filters (they decide how many rows survive), then this step replaces their choice
by a seeded random one of the same count. The draw is fair (issue 19): it is made among the rows the filters see
and may keep, those the sample stage kept whose solution is not empty, whose code parses (the score stage's own
checks) and, where the sandbox ran it, passed its asserts; not among every parsed sample, code that does not parse
included. The output holds every row of the samples dataset (nothing dropped silently): rows the sample stage
rejected keep their reason, kept rows that fail those checks get the score stage's reason (empty_response,
code_does_not_parse) or asserts_failed, eligible rows not drawn get `random_selection_dropped`. Its location
derives from the fingerprint of the samples, the count and the seed, so a re-run is free. Knows nothing of Prefect
or of rounds (flows/iteration.py calls it).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from synth_core.config import StorageConfig

STAGE_VERSION = 2  # 2: drawn among the rows the filters may keep (parsing, executable), not every parsed one
DROPPED = "random_selection_dropped"


def choose_random(ids: list[str], count: int, seed: int) -> set[str]:
    """`count` of `ids` chosen by a seeded hash of each id: the same seed and ids give the same choice whatever
    their order, and a different seed a different one."""
    rank = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    return set(rank[:count])


def ineligible_reason(row: dict) -> str | None:
    """Why a row the sample stage kept is not among the rows the filters may keep (None = it is): the score stage's
    checks (a non-empty solution whose code parses, for Python) and the sandbox's verdict where it ran."""
    from synth_core.parse import is_python, parse_error, solution_code
    from synth_core.sample import ASSERTS_FAILED
    from synth_core.score import EMPTY_RESPONSE, NO_PARSE

    response = row.get("response") or ""
    if not response.strip():
        return EMPTY_RESPONSE
    if is_python(row.get("language")) and parse_error(solution_code(response)) is not None:
        return NO_PARSE
    if row.get("exec_status") not in (None, "passed"):
        return ASSERTS_FAILED
    return None


def select_random(
    samples: str, filtered: str, seed: int, storage: StorageConfig | None = None, out: str | None = None
) -> str:
    """Keep a seeded random choice, among the rows of `samples` (a samples dataset) the filters may keep
    (`ineligible_reason`), of as many rows as `filtered` (the last filter's output) keeps; returns the URI of the
    output dataset (samples' schema).

    `out` defaults to `<storage.root>/random_selection/<fingerprint>`."""
    import pyarrow as pa

    from synth_core.config import StorageConfig
    from synth_core.storage import (
        OnePart,
        compute_funnel,
        fingerprint,
        join_uri,
        read_dataset,
        read_manifest,
        write_one_part_dataset,
    )

    storage = storage or StorageConfig()
    manifest = read_manifest(samples, storage)
    fmanifest = read_manifest(filtered, storage)
    count = fmanifest.kept_rows
    fp = fingerprint("random_selection", STAGE_VERSION, manifest.fingerprint, count, seed)
    out = out or join_uri(storage.root, "random_selection", fp)

    def build() -> OnePart:
        table = read_dataset(samples, storage=storage)
        columns = [
            c for c in ("sample_id", "reject_reason", "response", "language", "exec_status") if c in table.schema.names
        ]
        records = table.select(columns).to_pylist()
        reasons = [r["reject_reason"] if r["reject_reason"] is not None else ineligible_reason(r) for r in records]
        ids = [r["sample_id"] for r in records]
        parsed = [i for i, r in zip(ids, reasons, strict=True) if r is None]
        if count > len(parsed):  # a filter cannot keep more than it was given; a mismatch means wrong inputs
            raise ValueError(
                f"{filtered} keeps {count} rows but {samples} has only {len(parsed)} rows the filters may keep"
            )
        chosen = choose_random(parsed, count, seed)
        new = [r if r is not None else (None if i in chosen else DROPPED) for i, r in zip(ids, reasons, strict=True)]
        col = table.schema.get_field_index("reject_reason")
        table = table.set_column(col, table.schema.field(col), pa.array(new, pa.string()))
        return OnePart(
            table,
            funnel=compute_funnel(table),
            inputs=[samples, filtered],
            config={"seed": seed, "count": count},
            stats={"eligible": len(parsed), "kept": count, "filtered_by": fmanifest.stage},
            part_if_empty=False,
        )

    return write_one_part_dataset(out, fp, build, stage="random_selection", storage=storage)
