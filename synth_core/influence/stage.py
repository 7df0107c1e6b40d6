"""The influence stage: plan -> target features -> shards -> commit, with a fingerprinted output.

plan_influence -> target_features (one per checkpoint) -> influence_shard (one per shard of candidate rows)
-> commit_influence, as the synth_core.stage.Stage `STAGE` (the targets are its setup steps), or build_influence
for all of it in one call. flows/influence.py runs the targets and shards as tasks (flows/stage.run_stage). Every
gradient pass (one checkpoint x one shard, or x R) runs in a spawned process (synth_core.procs,
`features_in_process`), so a model's memory is gone when it returns.

Layout of the output folder (a dataset, like every stage's):
  part-*.parquet + _manifest.json   every candidate row, with `influence`, `influence_status`, reject_reason
  features/                         a dataset of the candidates' gradient features (feature_schema), per shard
  targets/ckpt-NN/                  a dataset of R's gradient features at checkpoint NN (mean LR in its stats)
Candidates are trained on as chats: the synthesis prompt with the seed snippet -> format_synthesis(instruction,
response), rendered as synth_core.train renders them, so the gradients are those training would take.
Top-fraction selection is global, so shards only compute and score; the commit decides and writes the rows.

What it leaves to others: the math (the other modules of synth_core.influence), the Prefect tasks, flow and CLI
(tasks/stage.py, flows/influence.py), and training the checkpoints (synth_core.train).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from synth_core.config import InfluenceConfig
from synth_core.influence.checkpoint import load_checkpoint_for_influence, resolve_influence_checkpoints
from synth_core.influence.errors import InfluenceError
from synth_core.influence.lora_grads import compute_grad_features, encode_rows, token_limit
from synth_core.influence.projection import check_same_projection, projection_device_type, projection_fingerprint
from synth_core.influence.scores import (
    DROP_REASON,
    choose_targets,
    influence_scores,
    select_top_fraction,
    target_group_keys,
)
from synth_core.stage import StageArtifact, funnel_artifact, run_stage_local

if TYPE_CHECKING:
    from synth_core.config import StorageConfig

STAGE_VERSION = 1
NO_ANSWER_REASON = "influence_no_answer"
_TEXT_COLUMNS = ["snippet", "language", "instruction", "response"]


@dataclass(frozen=True)
class InfluenceShard:
    """Rows [start, end) (all rows, kept or not) of one candidates part; `first_row` is the ordinal of `start`
    among all candidate rows."""

    part: Any  # synth_core.storage.PartInfo
    start: int
    end: int
    first_row: int

    @property
    def rows(self) -> int:
        return self.end - self.start


@dataclass
class InfluencePlan:
    """An influence run: inputs, resolved checkpoints, device type, output location and fingerprint, shards."""

    candidates_uri: str
    reference: str  # reference:builtin, a reference file or a dataset
    out_uri: str
    fp: str
    checkpoints: list[Any]  # synth_core.models.ResolvedModel, in the order given
    template: str
    device_type: str  # "cpu" | "cuda": the projection differs between them, so it is part of the fingerprint
    candidate_columns: list[str]  # the candidates' columns the chats need (+ reject_reason, sample_id)
    scorable_rows: int  # kept candidate rows (those that get a gradient)
    reference_rows: int
    notes: list[str] = field(default_factory=list)
    shards: list[InfluenceShard] = field(default_factory=list)
    target_groups: dict[str, str] | None = None  # ref_id -> its group (aggregate max_group; None for mean)

    def target_uri(self, checkpoint: int) -> str:
        from synth_core.storage import join_uri

        return join_uri(self.out_uri, "targets", f"ckpt-{checkpoint:02d}")

    @property
    def features_uri(self) -> str:
        from synth_core.storage import join_uri

        return join_uri(self.out_uri, "features")


def plan_influence(
    cfg: Any, candidates_uri: str, reference: str | None, checkpoints: Sequence[str], out: str | None = None
) -> InfluencePlan:
    """Check every input (checkpoints, R, the candidates' columns), cut shards and derive the output location.

    `cfg`: a RunConfig. `reference`: None or reference:builtin for the built-in R, a file, or a dataset.
    """
    from synth_core.reference import BUILTIN_REFERENCE, load_reference
    from synth_core.sample import load_template
    from synth_core.storage import fingerprint, join_uri, read_manifest, read_part

    resolved, notes = resolve_influence_checkpoints(checkpoints, cfg)
    reference = reference or BUILTIN_REFERENCE
    ref_table = load_reference(reference, cfg.storage)
    ref_fp = fingerprint("reference", ref_table.select(_TEXT_COLUMNS).to_pylist())
    groups = None
    if cfg.influence.aggregate == "max_group":
        groups = target_group_keys(ref_table.to_pylist(), cfg.influence.group_by)
        ref_fp = fingerprint(ref_fp, sorted(groups.items()))
    manifest = read_manifest(candidates_uri, cfg.storage)
    names = [f["name"] for f in manifest.schema]
    missing = [c for c in ("instruction", "response", "reject_reason") if c not in names]
    if missing:
        raise InfluenceError(f"{candidates_uri}: the candidates have no column {missing[0]!r} (a samples dataset?)")
    columns = [c for c in (*_TEXT_COLUMNS, "sample_id", "reject_reason") if c in names]
    template = load_template(cfg)
    device_type = projection_device_type()
    fp = fingerprint(
        "influence",
        STAGE_VERSION,
        manifest.fingerprint,
        ref_fp,
        [m.fingerprint for m in resolved],
        cfg.influence.model_dump(
            mode="json",
            exclude={
                "parallel_shards",
                "projector_cache_mb",
                "projection_rows",
                "projection",
                "sparse_jl_nonzeros",
                "compile_layers",
            }
            # group_by only matters to max_group: a mean run keeps its location.
            | ({"group_by"} if cfg.influence.aggregate == "mean" else set()),
        ),
        template,
        projection_fingerprint(cfg.influence, device_type),  # the resolved projection: auto on a CPU = sparse_jl
    )
    plan = InfluencePlan(
        candidates_uri=candidates_uri,
        reference=reference,
        out_uri=out or join_uri(cfg.storage.root, "influence", fp),
        fp=fp,
        checkpoints=resolved,
        template=template,
        device_type=device_type,
        candidate_columns=columns,
        scorable_rows=0,
        reference_rows=min(ref_table.num_rows, cfg.influence.max_targets or ref_table.num_rows),
        notes=notes,
        target_groups=groups,
    )
    first = 0
    for part in manifest.parts:
        reasons = read_part(candidates_uri, part, columns=["reject_reason"], storage=cfg.storage).column(0)
        plan.scorable_rows += reasons.null_count
        for start in range(0, part.rows, cfg.influence.shard_rows):
            end = min(start + cfg.influence.shard_rows, part.rows)
            plan.shards.append(InfluenceShard(part, start, end, first + start))
        first += part.rows
    return plan


def influence_done(plan: InfluencePlan, cfg: Any) -> bool:
    """True when the output already holds exactly this run: re-running is free."""
    from synth_core.storage import dataset_has_fingerprint

    return dataset_has_fingerprint(plan.out_uri, plan.fp, cfg.storage)


def prepare_output(plan: InfluencePlan, cfg: Any) -> None:
    """Hide another dataset's manifest at the output before anything writes there."""
    from synth_core.storage import hide_stale_dataset

    hide_stale_dataset(plan.out_uri, plan.fp, cfg.storage)
    hide_stale_dataset(plan.features_uri, plan.fp, cfg.storage)


def features_in_process(
    ckpt_ref: str,
    chats: list[list[dict[str, str]]],
    cfg: InfluenceConfig,
    storage: StorageConfig,
    candidates: bool,
    device_type: str,
) -> dict[str, Any]:
    """Gradient features of chats at one checkpoint (Adam-preconditioned for candidates when the checkpoint has
    its moments, plain for targets), with timings and the peak memory of this process. Runs in its own process.

    Returns plain data: feats [n, proj_dim] float16 (numpy), truncated, no_answer, projection_id, preconditioned,
    mean_lr, notes, tokens, seconds, peak_memory_mb, peak_gpu_mb.
    """
    import torch
    from transformers import AutoTokenizer

    from synth_core.models import resolve_model
    from synth_core.procs import TreeMemorySampler

    if device_type == "cuda" and not torch.cuda.is_available():
        raise InfluenceError("the run was planned for a GPU (its projection is CUDA's) but this process has none")
    with TreeMemorySampler(include_self=True) as mem:
        t0 = time.perf_counter()
        ckpt = load_checkpoint_for_influence(ckpt_ref, cfg, device=device_type, storage=storage)
        tok = AutoTokenizer.from_pretrained(resolve_model(ckpt_ref, storage=storage).path)
        rows = encode_rows(tok, chats)
        load_s = time.perf_counter() - t0
        out = compute_grad_features(ckpt.model, rows, cfg, optimizer_state=ckpt.adam if candidates else None)
    return {
        "feats": out.feats.numpy(),
        "truncated": out.truncated,
        "no_answer": out.no_answer,
        "projection_id": out.projection_id,
        "preconditioned": out.preconditioned,
        "mean_lr": ckpt.mean_lr,
        "notes": ckpt.notes,
        "tokens": out.tokens,
        "row_tokens": [min(len(r["input_ids"]), token_limit(ckpt.model, cfg.max_seq_len)) for r in rows],
        "seconds": round(out.seconds, 3),
        "load_s": round(load_s, 3),
        "peak_memory_mb": round(mem.peak_mb, 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device_type == "cuda" else None,
    }


def _feature_table(
    rows: Sequence[int], ids: Sequence[str | None], per_ckpt: Sequence[dict[str, Any]], proj_dim: int, scores=None
):
    """The feature_schema table of rows (their ordinals and ids) from one features_in_process result per checkpoint."""
    import numpy as np
    import pyarrow as pa

    from synth_core.schema import feature_schema

    n, m = len(rows), len(per_ckpt)
    first = per_ckpt[0] if per_ckpt else {"truncated": [], "no_answer": [], "row_tokens": [0] * n}
    truncated, no_answer = set(first["truncated"]), set(first["no_answer"])
    status = ["no_answer" if i in no_answer else "truncated" if i in truncated else "scored" for i in range(n)]
    if m:
        stacked = np.stack([r["feats"] for r in per_ckpt], axis=1).astype(np.float16)  # [n, m, proj_dim]
    else:
        stacked = np.zeros((n, 0, proj_dim), dtype=np.float16)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(stacked.reshape(-1), pa.float16()), proj_dim)
    feats = pa.ListArray.from_arrays(pa.array(np.arange(n + 1) * m, pa.int32()), inner)
    influence = [None if scores is None or status[i] == "no_answer" else float(scores[i]) for i in range(n)]
    return pa.Table.from_arrays(
        [
            pa.array(list(rows), pa.int64()),
            pa.array(list(ids), pa.string()),
            pa.array(influence, pa.float32()),
            pa.array(status, pa.string()),
            pa.array(first["row_tokens"], pa.int32()),
            feats.cast(feature_schema(proj_dim).field("feats").type),
        ],
        schema=feature_schema(proj_dim),
    )


def target_features(plan: InfluencePlan, checkpoint: int, cfg: Any) -> str:
    """R's gradient features at one checkpoint (plain gradients), as the dataset plan.target_uri(checkpoint);
    returns at once if it exists. Its manifest's stats hold the checkpoint's mean LR and projection_id."""
    from synth_core.chat import training_chats
    from synth_core.procs import run_in_subprocess
    from synth_core.reference import load_reference
    from synth_core.schema import feature_schema
    from synth_core.storage import OnePart, fingerprint, write_one_part_dataset

    uri = plan.target_uri(checkpoint)
    fp = fingerprint(plan.fp, "targets", checkpoint)

    def build() -> OnePart:
        ref = load_reference(plan.reference, cfg.storage)
        rows = choose_targets(ref.select([*_TEXT_COLUMNS, "ref_id"]).to_pylist(), cfg.influence)
        ckpt = plan.checkpoints[checkpoint]
        res = run_in_subprocess(
            features_in_process,
            ckpt.ref,
            training_chats(rows, plan.template),
            cfg.influence,
            cfg.storage,
            False,
            plan.device_type,
        )
        table = _feature_table(range(len(rows)), [r["ref_id"] for r in rows], [res], cfg.influence.proj_dim)
        stats = {k: v for k, v in res.items() if k not in ("feats", "row_tokens", "truncated", "no_answer")}
        stats |= {"rows": len(rows), "truncated": len(res["truncated"]), "no_answer": len(res["no_answer"])}
        schema = feature_schema(cfg.influence.proj_dim)
        return OnePart(table, schema=schema, inputs=[plan.reference, ckpt.ref], stats=stats)

    return write_one_part_dataset(uri, fp, build, stage="influence-targets", storage=cfg.storage)


def _read_targets(plan: InfluencePlan, cfg: Any) -> tuple[list[Any], list[float], list[str], list[str]]:
    """R's features per checkpoint [m, proj_dim] float16 (rows without a response token left out), the mean LRs,
    the projection ids and the m targets' ref_ids. Raises InfluenceError when a checkpoint's targets are missing."""
    import numpy as np
    import torch

    from synth_core.storage import DatasetError, read_dataset, read_manifest

    feats, lrs, pids, masks = [], [], [], []
    for c in range(len(plan.checkpoints)):
        uri = plan.target_uri(c)
        try:
            manifest = read_manifest(uri, cfg.storage)
        except DatasetError:
            raise InfluenceError(f"the target features of checkpoint {c} are not computed ({uri})") from None
        table = read_dataset(uri, columns=["row_id", "influence_status", "feats"], storage=cfg.storage)
        ids = table.column("row_id").to_pylist()
        flat = table.column("feats").combine_chunks().flatten().flatten()
        arr = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float16).reshape(table.num_rows, -1)
        feats.append(torch.from_numpy(arr.copy()))
        masks.append([s != "no_answer" for s in table.column("influence_status").to_pylist()])
        lrs.append(float(manifest.stats["mean_lr"]))
        pids.append(manifest.stats["projection_id"])
    keep = [all(col) for col in zip(*masks, strict=True)]
    if not any(keep):
        raise InfluenceError("no reference row keeps a response token within influence.max_seq_len")
    idx = torch.tensor([i for i, k in enumerate(keep) if k])
    return [f[idx] for f in feats], lrs, pids, [ids[i] for i, k in enumerate(keep) if k]


def _read_candidates(plan: InfluencePlan, shard: InfluenceShard, cfg: Any):
    from synth_core.storage import read_part

    table = read_part(plan.candidates_uri, shard.part, columns=plan.candidate_columns, storage=cfg.storage)
    return table.slice(shard.start, shard.rows)


def influence_shard(plan: InfluencePlan, shard: InfluenceShard, index: int, cfg: Any) -> Any:
    """Gradient features of one shard's kept rows at every checkpoint (one process each) and their influence,
    written as part `index` of the features dataset. Returns a ShardResult (at once if the part is done)."""
    import torch

    from synth_core.chat import training_chats
    from synth_core.procs import run_in_subprocess
    from synth_core.storage import ShardResult, finished_shard, write_part

    done = finished_shard(plan.features_uri, index, plan.fp, cfg.storage)
    if done is not None:
        return done
    t0 = time.perf_counter()
    table = _read_candidates(plan, shard, cfg)
    records = table.to_pylist()
    kept = [i for i, r in enumerate(records) if r["reject_reason"] is None]
    rows = [{c: records[i].get(c) for c in (*_TEXT_COLUMNS, "sample_id")} for i in kept]
    per_ckpt: list[dict[str, Any]] = []
    scores = None
    if rows:
        targets, lrs, pids, target_ids = _read_targets(plan, cfg)
        chats = training_chats(rows, plan.template)
        for c, ckpt in enumerate(plan.checkpoints):
            res = run_in_subprocess(
                features_in_process, ckpt.ref, chats, cfg.influence, cfg.storage, True, plan.device_type
            )
            check_same_projection(res["projection_id"], pids[c])
            per_ckpt.append(res)
        cand = [torch.from_numpy(r["feats"]) for r in per_ckpt]
        groups = [plan.target_groups[i] for i in target_ids] if plan.target_groups is not None else None
        scores = influence_scores(cand, targets, lrs, cfg.influence.aggregate, groups).tolist()
    out = _feature_table(
        [shard.first_row + i for i in kept],
        [r.get("sample_id") for r in rows],
        per_ckpt,
        cfg.influence.proj_dim,
        scores,
    )
    part = write_part(plan.features_uri, index, out, plan.fp, storage=cfg.storage)
    stats = {
        "scored_rows": len(rows),
        "gradient_s": round(sum(r["seconds"] for r in per_ckpt), 3),
        "load_s": round(sum(r["load_s"] for r in per_ckpt), 3),
        "tokens": sum(r["tokens"] for r in per_ckpt),
        "peak_memory_mb": max((r["peak_memory_mb"] for r in per_ckpt), default=None),
        "peak_gpu_mb": max((r["peak_gpu_mb"] or 0 for r in per_ckpt), default=None) or None,
        "notes": sorted({n for r in per_ckpt for n in r["notes"]}),
        "plain_gradients": any(not r["preconditioned"] for r in per_ckpt),
    }
    return ShardResult(part, time.perf_counter() - t0, stats=stats)


def _quantiles(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def q(p: float) -> float:  # linear interpolation between closest ranks (numpy's default)
        pos = p * (len(ordered) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {k: round(q(p), 6) for k, p in (("min", 0), ("p10", 0.1), ("p25", 0.25), ("p50", 0.5))} | {
        k: round(q(p), 6) for k, p in (("p75", 0.75), ("p90", 0.9), ("max", 1.0))
    }


def commit_influence(plan: InfluencePlan, results: list[Any], cfg: Any, wall_s: float) -> Any:
    """Select the top fraction over all scored rows, write every candidate row with its influence (one part per
    shard) and the manifests of the features and the output. Returns the output's Manifest."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from synth_core.schema import feature_schema, influence_schema
    from synth_core.storage import (
        commit_dataset,
        compute_funnel,
        merge_funnels,
        read_dataset,
        read_manifest,
        read_part,
        write_part,
    )

    commit_dataset(
        plan.features_uri,
        [r.part for r in results],
        feature_schema(cfg.influence.proj_dim),
        plan.fp,
        stage="influence-features",
        inputs=[plan.candidates_uri],
        storage=cfg.storage,
    )
    feats = read_dataset(plan.features_uri, columns=["row", "influence", "influence_status"], storage=cfg.storage)
    by_row = dict(zip(feats.column("row").to_pylist(), feats.column("influence").to_pylist(), strict=True))
    status = dict(zip(feats.column("row").to_pylist(), feats.column("influence_status").to_pylist(), strict=True))
    scored = [r for r, s in by_row.items() if s is not None]
    kept_flags, _ = select_top_fraction([by_row[r] for r in scored], cfg.influence.keep_fraction)
    kept_rows = {r for r, k in zip(scored, kept_flags, strict=True) if k}
    threshold = min((by_row[r] for r in kept_rows), default=None)
    in_manifest = read_manifest(plan.candidates_uri, cfg.storage)
    schema = influence_schema(in_manifest.arrow())
    reason_order = [*in_manifest.funnel.get("rejected", {}), NO_ANSWER_REASON, DROP_REASON]
    parts = []
    for i, shard in enumerate(plan.shards):
        table = read_part(plan.candidates_uri, shard.part, storage=cfg.storage).slice(shard.start, shard.rows)
        ordinals = range(shard.first_row, shard.first_row + shard.rows)
        reasons, details = table.column("reject_reason").to_pylist(), None
        if "detail" in table.column_names:
            details = table.column("detail").to_pylist()
        for k, r in enumerate(ordinals):
            st = status.get(r)
            if st == "no_answer":
                reasons[k] = NO_ANSWER_REASON
                if details is not None:
                    details[k] = f"no response token within influence.max_seq_len ({cfg.influence.max_seq_len})"
            elif st is not None and r not in kept_rows:
                reasons[k] = DROP_REASON
                if details is not None:
                    details[k] = (
                        f"influence {by_row[r]:.4g} below the top {cfg.influence.keep_fraction:g} "
                        f"(threshold {threshold:.4g})"
                    )
        for name in ("influence", "influence_status"):
            if name in table.column_names:
                table = table.drop_columns([name])
        table = table.set_column(table.column_names.index("reject_reason"), "reject_reason", pa.array(reasons))
        if details is not None:
            table = table.set_column(table.column_names.index("detail"), "detail", pa.array(details, pa.string()))
        table = table.append_column("influence", pa.array([by_row.get(r) for r in ordinals], pa.float32()))
        table = table.append_column("influence_status", pa.array([status.get(r) for r in ordinals], pa.string()))
        table = table.select(schema.names).cast(schema)
        parts.append(write_part(plan.out_uri, i, table, plan.fp, compute_funnel(table, reason_order), cfg.storage))
    values = [by_row[r] for r in scored]
    work = [r.stats for r in results if not r.cached]
    grad_s = sum(s["gradient_s"] for s in work)
    scored_now = sum(s["scored_rows"] for s in work)
    targets = []
    if plan.scorable_rows:  # without a row to score, no target features were computed
        targets = [read_manifest(plan.target_uri(c), cfg.storage).stats for c in range(len(plan.checkpoints))]
    lr_sum = sum(t["mean_lr"] for t in targets) or 1.0
    notes = sorted({*plan.notes, *(n for s in work for n in s["notes"])})
    if any(s["plain_gradients"] for s in work):
        notes.append("plain gradients used for candidates of at least one checkpoint")
    n_status = pc.value_counts(feats.column("influence_status")).to_pylist() if feats.num_rows else []
    counts = {d["values"]: d["counts"] for d in n_status}
    peaks = [s["peak_memory_mb"] for s in work if s["peak_memory_mb"]] + [t["peak_memory_mb"] for t in targets]
    stats = {
        "rows": sum(p.rows for p in parts),
        "scored": len(scored),
        "kept": len(kept_rows),
        "truncated": counts.get("truncated", 0),
        "no_answer": counts.get("no_answer", 0),
        "shards": len(results),
        "cached_shards": sum(r.cached for r in results),
        "wall_s": round(wall_s, 3),
        "gradient_s": round(grad_s, 3),
        "target_gradient_s": round(sum(t["seconds"] for t in targets), 3),
        "model_load_s": round(sum(s["load_s"] for s in work) + sum(t["load_s"] for t in targets), 3),
        "tokens": sum(s["tokens"] for s in work),
        # one gradient feature = one row at one checkpoint
        "features_per_s": round(scored_now * len(plan.checkpoints) / grad_s, 2) if grad_s > 0 else None,
        "rows_per_s": round(scored_now / wall_s, 2) if wall_s > 0 and scored_now else None,
        "tokens_per_s": round(sum(s["tokens"] for s in work) / grad_s, 1) if grad_s > 0 else None,
        "peak_memory_mb": max(peaks, default=None),
        "peak_gpu_mb": max([s["peak_gpu_mb"] or 0 for s in work] + [t["peak_gpu_mb"] or 0 for t in targets], default=0)
        or None,
        "projection_id": targets[0]["projection_id"] if targets else None,
        "checkpoints": [
            {"ref": m.ref, "mean_lr": t["mean_lr"], "weight": round(t["mean_lr"] / lr_sum, 6)} if t else {"ref": m.ref}
            for m, t in zip(plan.checkpoints, targets or [None] * len(plan.checkpoints), strict=True)
        ],
        "reference_rows": plan.reference_rows,
        "reference_truncated": sum(t["truncated"] for t in targets),
        "keep_fraction": cfg.influence.keep_fraction,
        "threshold": threshold,
        "scores": _quantiles(values),
        "notes": notes,
        "features": plan.features_uri,
    }
    return commit_dataset(
        plan.out_uri,
        parts,
        schema,
        plan.fp,
        stage="influence",
        funnel=merge_funnels([p.funnel for p in parts], reason_order),
        inputs=[plan.candidates_uri, plan.reference, *[m.ref for m in plan.checkpoints]],
        config=cfg.model_dump(mode="json", include={"influence"}),
        stats=stats,
        storage=cfg.storage,
    )


class InfluenceStage:
    """The influence stage as a synth_core.stage.Stage: R's features per checkpoint first (its setup steps, every
    shard reads them), then one shard of candidates per task, then the commit (which selects the top fraction)."""

    name = "influence"

    def out_uri(self, plan: InfluencePlan) -> str:
        return plan.out_uri

    def fingerprint(self, plan: InfluencePlan) -> str:
        return plan.fp

    def done(self, plan: InfluencePlan, cfg: Any) -> bool:
        return influence_done(plan, cfg)

    def prepare(self, plan: InfluencePlan, cfg: Any) -> None:
        prepare_output(plan, cfg)

    def setup(self, plan: InfluencePlan) -> list[int]:
        return list(range(len(plan.checkpoints))) if plan.scorable_rows else []  # nothing to score: no targets

    def run_setup(self, plan: InfluencePlan, checkpoint: int, index: int, cfg: Any) -> str:
        return target_features(plan, checkpoint, cfg)

    def shards(self, plan: InfluencePlan) -> list[InfluenceShard]:
        return plan.shards

    def window(self, cfg: Any) -> int | None:
        return cfg.influence.parallel_shards

    def run_shard(self, plan: InfluencePlan, shard: InfluenceShard, index: int, cfg: Any) -> Any:
        return influence_shard(plan, shard, index, cfg)

    def commit(self, plan: InfluencePlan, results: list[Any], cfg: Any, elapsed_s: float) -> Any:
        return commit_influence(plan, results, cfg, elapsed_s)

    def describe(self, plan: InfluencePlan, cfg: Any) -> str:
        return (
            f"influence {plan.fp}: {plan.scorable_rows} rows to score in {len(plan.shards)} shards, "
            f"{len(plan.checkpoints)} checkpoints, {plan.reference_rows} reference rows, on {plan.device_type}"
        )

    def summary(self, plan: InfluencePlan, manifest: Any) -> str:
        s = manifest.stats
        return (
            f"influence written to {plan.out_uri}: {manifest.num_rows} rows, {s['scored']} scored, {s['kept']} kept; "
            f"{s['features_per_s']} features/s, {s['tokens_per_s']} tokens/s, peak {s['peak_memory_mb']} MiB; "
            f"notes: {'; '.join(s['notes']) or 'none'}"
        )

    def artifacts(self, plan: InfluencePlan, manifest: Any, cfg: Any) -> list[StageArtifact]:
        return [
            funnel_artifact("influence-funnel", "Influence", manifest, plan.out_uri),
            StageArtifact(
                key="influence-histogram",
                description=f"Influence scores: {plan.out_uri}",
                markdown=histogram_markdown(plan.out_uri, cfg),
            ),
        ]


STAGE = InfluenceStage()


def build_influence(
    cfg: Any, candidates_uri: str, reference: str | None, checkpoints: Sequence[str], out: str | None = None
) -> str:
    """The whole stage in this process, target set after target set and shard after shard; returns the output."""
    t0 = time.perf_counter()
    plan = plan_influence(cfg, candidates_uri, reference, checkpoints, out)
    return run_stage_local(STAGE, plan, cfg, t0).out_uri


def histogram_markdown(out_uri: str, cfg: Any, bins: int = 10) -> str:
    """The influence histogram of an output as a markdown table (bins, rows, bar, how many of them were kept)."""
    from synth_core.report import histogram_markdown as markdown
    from synth_core.storage import read_dataset

    table = read_dataset(out_uri, columns=["influence", "reject_reason"], storage=cfg.storage)
    return markdown(
        list(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True)), "influence", bins
    )
