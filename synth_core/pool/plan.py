"""The pool's plan: the ingest shards (lists of source units) and where each step writes, under which fingerprint.

plan_pool lists the sources (sources.py), groups files into shards of `pool.shard_files` (a Parquet row range is a
shard of its own) and derives the three fingerprints (ingest: the config, the signature parameters and every
unit's stamp; dedup: ingest's and the dedup config; the pool: dedup's, the decontam config and the benchmarks'
stamps). DecontamPlan is the last step's plan, made by steps.dedup_and_plan.

What it leaves to others: running the steps (steps.py, stage.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from synth_core.config import RunConfig
from synth_core.decontam import benchmark_stamps
from synth_core.pool.sources import SourceUnit, default_sources, list_source_units
from synth_core.storage import PartInfo, fingerprint, join_uri

log = logging.getLogger(__name__)

# Bump when a step's output changes for the same inputs and config: it invalidates earlier outputs.
# 2: hostile inputs (FIFOs, undecodable names, over-long paths) are rows; parser crashes are parse_error.
STAGE_VERSION = 2


@dataclass
class PoolTargets:
    """Where each step of a pool build writes, under which fingerprint. Small: passed to every task."""

    ingest_uri: str
    dedup_uri: str
    out_uri: str
    ingest_fp: str
    dedup_fp: str
    pool_fp: str
    sources: list[str] = field(default_factory=list)


@dataclass
class PoolPlan:
    """A pool build: its targets and the ingest shards (lists of source units)."""

    targets: PoolTargets
    shards: list[list[SourceUnit]]


def plan_pool(cfg: RunConfig, out: str | None = None) -> PoolPlan:
    """List the sources and derive shard lists and fingerprinted step locations."""
    units = list_source_units(cfg)
    if not units:
        # A valid, empty pool; but a folder with no file matching `include` is more often a mistake than a wish.
        log.warning(
            "no input in %s matches pool.include %s: the pool will be empty",
            ", ".join(cfg.pool.sources or default_sources()),
            cfg.pool.include,
        )
    shards: list[list[SourceUnit]] = []
    current: list[SourceUnit] = []
    for u in units:
        if u.kind == "parquet":
            shards.append([u])  # a Parquet row range is already a shard-sized unit
            continue
        current.append(u)
        if len(current) >= cfg.pool.shard_files:
            shards.append(current)
            current = []
    if current:
        shards.append(current)
    # Ingest computes signatures only when near dedup is on: the switch is part of its output.
    sig_params = {k: getattr(cfg.dedup, k) for k in ("near", "num_perm", "shingle_size", "seed")}
    ingest_fp = fingerprint(
        "pool.ingest",
        STAGE_VERSION,
        cfg.pool,
        sig_params,
        [(u.uri, u.size, u.stamp, u.row_start, u.row_end) for u in units],
    )
    dedup_fp = fingerprint("pool.dedup", STAGE_VERSION, ingest_fp, cfg.dedup)
    bench_stamps = benchmark_stamps(cfg.decontam, cfg.storage)
    pool_fp = fingerprint("pool.decontam", STAGE_VERSION, dedup_fp, cfg.decontam, bench_stamps)
    work = join_uri(cfg.storage.root, "pool", pool_fp)
    targets = PoolTargets(
        ingest_uri=join_uri(cfg.storage.root, "pool-ingest", ingest_fp),
        dedup_uri=join_uri(cfg.storage.root, "pool-dedup", dedup_fp),
        out_uri=out or work,
        ingest_fp=ingest_fp,
        dedup_fp=dedup_fp,
        pool_fp=pool_fp,
        sources=list(cfg.pool.sources or default_sources()),
    )
    return PoolPlan(targets=targets, shards=shards)


@dataclass
class DecontamPlan:
    """The pool's last step: the dedup parts to decontaminate (one shard each), and the earlier steps' throughput
    for the pool's manifest."""

    targets: PoolTargets
    parts: list[PartInfo]
    steps: list[dict[str, Any]] = field(default_factory=list)
