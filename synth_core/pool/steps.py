"""The pool's steps: ingest_shard (read, filter, cut, MinHash signatures), dedup_pool (global exact + near dedup,
re-partitioned), decontaminate_shard, and the manifests of the ingest and pool datasets.

Every step writes at its fingerprinted location and skips itself when that dataset (or that shard's part) already
exists.

What it leaves to others: the order they run in and their executors (stage.py, flows/pool.py), the dedup and
decontamination math (synth_core.dedup, synth_core.decontam).
"""

from __future__ import annotations

import time
from typing import Any

from synth_core.config import RunConfig
from synth_core.decontam import CONTAMINATED, benchmark_index
from synth_core.dedup import EXACT_DUPLICATE, compute_signatures, find_duplicates
from synth_core.errors import describe
from synth_core.pool.documents import PARSER_CRASHES, check_document, rejected_doc_row, snippet_rows
from synth_core.pool.plan import DecontamPlan, PoolPlan, PoolTargets
from synth_core.pool.read import read_unit
from synth_core.pool.reasons import EMPTY, PARSE_ERROR, REASON_ORDER
from synth_core.pool.sources import SourceUnit
from synth_core.schema import POOL_SCHEMA, pool_schema_with_minhash
from synth_core.storage import (
    Manifest,
    PartInfo,
    ShardResult,
    commit_dataset,
    compute_funnel,
    dataset_has_fingerprint,
    finished_shard,
    hide_stale_dataset,
    merge_funnels,
    read_dataset,
    read_manifest,
    read_part,
    step_stats,
    write_part,
)


def ingest_shard(units: list[SourceUnit], index: int, plan: PoolTargets, cfg: RunConfig) -> ShardResult:
    """Read, filter and cut one shard of source units, compute MinHash signatures, write part `index`."""
    import pyarrow as pa

    done = finished_shard(plan.ingest_uri, index, plan.ingest_fp, cfg.storage)
    if done is not None:
        return done
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for unit in units:
        for doc in read_unit(unit, cfg):
            if doc.reject_reason is None:
                check_document(doc, cfg)
            if doc.reject_reason is not None:
                rows.append(rejected_doc_row(doc))
                continue
            try:
                cut = snippet_rows(doc, cfg)
            except PARSER_CRASHES as err:  # 'ast' mode parses again: the same crash, the same answer
                doc.reject_reason, doc.detail = PARSE_ERROR, describe(err)
                rows.append(rejected_doc_row(doc))
                continue
            if not cut:
                doc.reject_reason, doc.detail = EMPTY, "no snippet could be cut"
                rows.append(rejected_doc_row(doc))
            rows.extend(cut)
    kept = [i for i, r in enumerate(rows) if r["reject_reason"] is None]
    signatures = (
        compute_signatures([rows[i]["content"] for i in kept], cfg.dedup) if (kept and cfg.dedup.near) else None
    )
    minhash: list[Any] = [None] * len(rows)
    if signatures is not None:
        for j, i in enumerate(kept):
            minhash[i] = signatures[j]
    schema = pool_schema_with_minhash(cfg.dedup.num_perm)
    columns = {name: [r[name] for r in rows] for name in POOL_SCHEMA.names}
    columns["minhash"] = minhash
    table = pa.Table.from_pydict(columns, schema=schema)
    funnel = compute_funnel(table, REASON_ORDER)
    part = write_part(plan.ingest_uri, index, table, plan.ingest_fp, funnel, cfg.storage)
    return ShardResult(part, time.perf_counter() - t0)


def dedup_pool(plan: PoolTargets, cfg: RunConfig) -> list[PartInfo]:
    """Global exact + near dedup of the ingested rows; writes them re-partitioned for decontamination."""
    import pyarrow as pa

    if dataset_has_fingerprint(plan.dedup_uri, plan.dedup_fp, cfg.storage):
        return read_manifest(plan.dedup_uri, cfg.storage).parts
    t0 = time.perf_counter()
    table = read_dataset(plan.ingest_uri, storage=cfg.storage)
    rejected = [r is not None for r in table.column("reject_reason").to_pylist()]
    signatures = None
    if cfg.dedup.near:
        import numpy as np

        # An empty source is a valid, empty pool: zero rows give a [0, num_perm] signature matrix.
        signatures = np.zeros((table.num_rows, cfg.dedup.num_perm), dtype=np.uint32)
        if table.num_rows:
            sigs = table.column("minhash").combine_chunks()
            flat = sigs.flatten().to_numpy(zero_copy_only=False)
            valid = ~np.array(rejected, dtype=bool)
            signatures[valid] = flat.reshape(-1, cfg.dedup.num_perm)
    ids = table.column("snippet_id").to_pylist()
    dups = find_duplicates(ids, signatures, cfg.dedup, skip=rejected)
    reasons = table.column("reject_reason").to_pylist()
    details = table.column("detail").to_pylist()
    dup_of = table.column("duplicate_of").to_pylist()
    sources, starts, ends = (table.column(c).to_pylist() for c in ("source", "line_start", "line_end"))
    for i, d in enumerate(dups):
        if d is None:
            continue
        j = d.index_of
        reasons[i], dup_of[i] = d.reason, d.duplicate_of
        where = f"{sources[j]}:{starts[j]}-{ends[j]}"
        details[i] = (
            f"duplicate of {where}"
            if d.reason == EXACT_DUPLICATE
            else f"near duplicate of {where} (Jaccard ~{d.similarity:.2f})"
        )
    table = table.drop_columns(["minhash"])
    table = table.set_column(
        table.schema.get_field_index("reject_reason"), "reject_reason", pa.array(reasons, pa.string())
    )
    table = table.set_column(table.schema.get_field_index("detail"), "detail", pa.array(details, pa.string()))
    table = table.set_column(
        table.schema.get_field_index("duplicate_of"), "duplicate_of", pa.array(dup_of, pa.string())
    )
    table = table.cast(POOL_SCHEMA)
    parts = []
    step = cfg.pool.shard_rows
    for k, start in enumerate(range(0, table.num_rows, step)):
        chunk = table.slice(start, step)
        parts.append(
            write_part(plan.dedup_uri, k, chunk, plan.dedup_fp, compute_funnel(chunk, REASON_ORDER), cfg.storage)
        )
    seconds = time.perf_counter() - t0
    commit_dataset(
        plan.dedup_uri,
        parts,
        POOL_SCHEMA,
        plan.dedup_fp,
        stage="pool.dedup",
        funnel=compute_funnel(table, REASON_ORDER),
        inputs=[plan.ingest_uri],
        config=cfg.dedup.model_dump(mode="json"),
        stats={"seconds": seconds, "rows_per_s": table.num_rows / seconds if seconds else None},
        storage=cfg.storage,
    )
    return parts


def decontaminate_shard(plan: PoolTargets, part: PartInfo, index: int, cfg: RunConfig) -> ShardResult:
    """Match the kept rows of one dedup part against the benchmarks; write final part `index`."""
    import pyarrow as pa

    done = finished_shard(plan.out_uri, index, plan.pool_fp, cfg.storage)
    if done is not None:
        return done
    t0 = time.perf_counter()
    table = read_part(plan.dedup_uri, part, storage=cfg.storage).cast(POOL_SCHEMA)
    index_ = benchmark_index(cfg.decontam, cfg.storage)
    reasons = table.column("reject_reason").to_pylist()
    details = table.column("detail").to_pylist()
    contaminated = table.column("contaminated_by").to_pylist()
    for i, text in enumerate(table.column("content").to_pylist()):
        if reasons[i] is not None or text is None:
            continue
        m = index_.match(text)
        if m is not None:
            reasons[i], details[i], contaminated[i] = CONTAMINATED, m.detail, m.label
    for name, values in (("reject_reason", reasons), ("detail", details), ("contaminated_by", contaminated)):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
    funnel = compute_funnel(table, REASON_ORDER)
    info = write_part(plan.out_uri, index, table, plan.pool_fp, funnel, cfg.storage)
    return ShardResult(info, time.perf_counter() - t0)


def commit_pool(plan: PoolTargets, results: list[ShardResult], cfg: RunConfig, stats: dict[str, Any]) -> Manifest:
    """Write the pool's manifest: parts, funnel, config and per-step throughput."""
    funnel = merge_funnels([r.funnel for r in results], REASON_ORDER)
    return commit_dataset(
        plan.out_uri,
        [r.part for r in results],
        POOL_SCHEMA,
        plan.pool_fp,
        stage="pool",
        funnel=funnel,
        inputs=plan.sources,
        config=cfg.model_dump(mode="json", include={"pool", "dedup", "decontam"}),
        stats=stats,
        storage=cfg.storage,
    )


def pool_is_built(plan: PoolTargets, cfg: RunConfig) -> bool:
    """True when the output already holds this exact pool (same fingerprint): re-running is free."""
    return dataset_has_fingerprint(plan.out_uri, plan.pool_fp, cfg.storage)


def dedup_step_stats(parts: list[PartInfo], wall_s: float) -> dict[str, Any]:
    """Throughput of the (single-task) dedup step."""
    rows = sum(p.rows for p in parts)
    return {
        "step": "dedup",
        "shards": 1,
        "rows": rows,
        "wall_s": round(wall_s, 3),
        "rows_per_s": round(rows / wall_s, 1) if wall_s > 0 else None,
    }


def commit_ingest(plan: PoolTargets, results: list[ShardResult], cfg: RunConfig) -> Manifest:
    """Write the ingest dataset's manifest (the input of dedup)."""
    return commit_dataset(
        plan.ingest_uri,
        [r.part for r in results],
        pool_schema_with_minhash(cfg.dedup.num_perm),
        plan.ingest_fp,
        stage="pool.ingest",
        funnel=merge_funnels([r.funnel for r in results], REASON_ORDER),
        inputs=plan.sources,
        config=cfg.pool.model_dump(mode="json"),
        storage=cfg.storage,
    )


def dedup_and_plan(plan: PoolPlan, ingest: list[ShardResult], ingest_wall_s: float, cfg: RunConfig) -> DecontamPlan:
    """Global dedup of the ingested rows (one step: it needs every signature), then the decontamination's plan."""
    t = time.perf_counter()
    parts = dedup_pool(plan.targets, cfg)
    steps = [step_stats("ingest", ingest, ingest_wall_s), dedup_step_stats(parts, time.perf_counter() - t)]
    return DecontamPlan(plan.targets, parts, steps)


def prepare_output(plan: PoolTargets, cfg: RunConfig) -> None:
    """Before writing parts into the output: hide an older, different pool there (remove its manifest)."""
    hide_stale_dataset(plan.out_uri, plan.pool_fp, cfg.storage)
