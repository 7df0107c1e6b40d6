"""Datasets: parts, done-markers, the manifest written last, fingerprints, funnels, and reading what a manifest lists.

What it leaves to others: reaching the storage (fs.py) and the writer lock of an output location (lock.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import resource
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from synth_core.config import StorageConfig
from synth_core.storage.fs import DatasetError, get_fs, is_local, storage_call, write_bytes_atomic

if TYPE_CHECKING:
    import pyarrow as pa

MANIFEST_NAME = "_manifest.json"
MARKERS_DIR = "_parts"
FORMAT_VERSION = 1


def code_version() -> str:
    """The installed package version (recorded in every manifest)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scoder-factory")
    except PackageNotFoundError:
        return "0+unknown"


def fingerprint(*items: Any) -> str:
    """A stable 16-hex-digit hash of JSON-serialisable items (configs, input fingerprints, ids)."""
    blob = json.dumps(items, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@dataclass
class PartInfo:
    """One written part: its file name (relative to the dataset), row count, and what wrote it."""

    name: str
    rows: int
    fingerprint: str = ""  # of the dataset this part belongs to: a stale part of another run never counts
    funnel: dict[str, Any] = field(default_factory=dict)  # the part's own funnel, summed at commit


@dataclass
class Manifest:
    """What `_manifest.json` holds; see the module docstring."""

    fingerprint: str
    parts: list[PartInfo]
    num_rows: int
    schema: list[dict[str, str]]
    arrow_schema: str
    stage: str = ""
    code_version: str = ""
    created_at: float = 0.0
    funnel: dict[str, Any] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def kept_rows(self) -> int:
        """Rows its stage kept (the funnel's `kept`; every row when it has no funnel)."""
        return int(self.funnel.get("kept", self.num_rows)) if self.funnel else self.num_rows

    def arrow(self) -> pa.Schema:
        import pyarrow as pa

        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.arrow_schema)))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        data["parts"] = [PartInfo(**p) for p in data.get("parts", [])]
        return cls(**data)


@dataclass
class ShardResult:
    """What a shard step returns to its orchestrator: its part, its funnel and its throughput."""

    part: PartInfo
    seconds: float
    cached: bool = False
    stats: dict[str, Any] = field(default_factory=dict)  # stage-specific throughput (tokens, load time, ...)

    @property
    def funnel(self) -> dict[str, Any]:
        return self.part.funnel

    @property
    def rows(self) -> int:
        return self.part.rows


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_part(
    dataset_uri: str,
    index: int,
    table: pa.Table,
    fingerprint: str = "",
    funnel: dict[str, Any] | None = None,
    storage: StorageConfig | None = None,
) -> PartInfo:
    """Write shard `index` of a dataset: the Parquet part, then its done-marker.

    Overwrites a leftover part of a crashed earlier attempt; the marker is what makes it count.
    """
    storage = storage or StorageConfig()
    with storage_call(dataset_uri, storage):
        return _write_part(dataset_uri, index, table, fingerprint, funnel, storage)


def _write_part(
    dataset_uri: str,
    index: int,
    table: pa.Table,
    fingerprint: str,
    funnel: dict[str, Any] | None,
    storage: StorageConfig,
) -> PartInfo:
    import pyarrow.parquet as pq

    fs, root = get_fs(dataset_uri, storage)
    fs.makedirs(root, exist_ok=True)
    name = part_name(index)
    if is_local(fs):
        # A temporary name, then a rename: a second writer or a crash never leaves a half-written part under the
        # final name that a committed manifest (or a reader holding one) lists.
        tmp = f"{root}/{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with fs.open(tmp, "wb") as f:
                pq.write_table(table, f, compression=storage.part_compression)
            os.replace(tmp, f"{root}/{name}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        # An object store publishes an object when its upload completes (one PUT, or a multipart upload's
        # CompleteMultipartUpload): readers see the old object or the new one, never a part of it.
        with fs.open(f"{root}/{name}", "wb") as f:
            pq.write_table(table, f, compression=storage.part_compression)
    info = PartInfo(name=name, rows=table.num_rows, fingerprint=fingerprint, funnel=funnel or {})
    write_bytes_atomic(fs, f"{root}/{MARKERS_DIR}/{index:05d}.json", json.dumps(asdict(info)).encode())
    return info


def read_part_marker(
    dataset_uri: str, index: int, fingerprint: str = "", storage: StorageConfig | None = None
) -> PartInfo | None:
    """The marker of a finished shard of this fingerprint, or None when that shard has not finished."""
    fs, root = get_fs(dataset_uri, storage)
    path = f"{root}/{MARKERS_DIR}/{index:05d}.json"
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        try:
            info = PartInfo(**json.loads(f.read()))
        except (ValueError, TypeError):
            return None  # a torn marker: the shard runs again
    if info.fingerprint != fingerprint or not fs.exists(f"{root}/{info.name}"):
        return None
    return info


def finished_shard(
    dataset_uri: str, index: int, fingerprint: str, storage: StorageConfig | None = None
) -> ShardResult | None:
    """The result of shard `index` if a run of this fingerprint already finished it (its marker), else None.

    Every sharded step starts with this check, which is what makes re-running a crashed stage redo only
    the shards that had not finished.
    """
    marker = read_part_marker(dataset_uri, index, fingerprint, storage)
    return ShardResult(marker, 0.0, cached=True) if marker is not None else None


def forget_shard(dataset_uri: str, index: int, storage: StorageConfig | None = None) -> None:
    """Remove shard `index`'s done-marker (its part stays until overwritten): a resumed run redoes that shard.

    For a shard that finished with failures worth another try (a teacher's failed requests).
    """
    fs, root = get_fs(dataset_uri, storage)
    path = f"{root}/{MARKERS_DIR}/{index:05d}.json"
    if fs.exists(path):
        fs.rm(path)


def compute_funnel(table: pa.Table, reason_order: Sequence[str] = ()) -> dict[str, Any]:
    """Rows in, kept and rejected per reason, from the `reject_reason` column (null = kept)."""
    reasons = table.column("reject_reason").to_pylist() if table.num_rows else []
    counts = Counter(r for r in reasons if r is not None)
    return _funnel(len(reasons), len(reasons) - sum(counts.values()), counts, reason_order)


def merge_funnels(funnels: Iterable[dict[str, Any]], reason_order: Sequence[str] = ()) -> dict[str, Any]:
    """Add up the funnels of several shards."""
    total: Counter[str] = Counter()
    rows_in = kept = 0
    for fn in funnels:
        rows_in += fn["rows_in"]
        kept += fn["kept"]
        total.update(fn["rejected"])
    return _funnel(rows_in, kept, total, reason_order)


def _funnel(rows_in: int, kept: int, counts: Counter[str], reason_order: Sequence[str]) -> dict[str, Any]:
    """The funnel record; reasons in pipeline order, unknown ones after them alphabetically."""
    order = [r for r in reason_order if r in counts] + sorted(r for r in counts if r not in reason_order)
    return {"rows_in": rows_in, "kept": kept, "rejected": {r: counts[r] for r in order}}


def commit_dataset(
    dataset_uri: str,
    parts: Sequence[PartInfo],
    schema: pa.Schema,
    fingerprint: str,
    *,
    stage: str = "",
    funnel: dict[str, Any] | None = None,
    inputs: Sequence[str] = (),
    config: dict[str, Any] | None = None,
    stats: dict[str, Any] | None = None,
    storage: StorageConfig | None = None,
) -> Manifest:
    """Write `_manifest.json` listing `parts`: from now on the dataset exists."""
    fs, root = get_fs(dataset_uri, storage)
    fs.makedirs(root, exist_ok=True)
    parts = sorted(parts, key=lambda p: p.name)
    manifest = Manifest(
        fingerprint=fingerprint,
        parts=list(parts),
        num_rows=sum(p.rows for p in parts),
        schema=[{"name": f.name, "type": str(f.type)} for f in schema],
        arrow_schema=base64.b64encode(schema.serialize().to_pybytes()).decode("ascii"),
        stage=stage,
        code_version=code_version(),
        created_at=time.time(),
        funnel=funnel or {},
        inputs=list(inputs),
        config=config or {},
        stats=stats or {},
    )
    with storage_call(dataset_uri, storage):
        write_bytes_atomic(fs, f"{root}/{MANIFEST_NAME}", manifest.to_json().encode("utf-8"))
    return manifest


@dataclass
class OnePart:
    """What the builder of a one-part dataset returns: the part's rows and the manifest's fields.

    `funnel` goes into the manifest, and into the part's record too unless `funnel_in_part` is off (the train
    and release parts never carried one; kept so their manifests stay as they were). `part_if_empty` off writes no
    part for a table without rows: Parquet readers (datasets) refuse a file without a row group.
    """

    table: pa.Table
    schema: pa.Schema | None = None  # the manifest's Arrow schema; None = the table's
    funnel: dict[str, Any] | None = None
    inputs: Sequence[str] = ()
    config: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None
    funnel_in_part: bool = True
    part_if_empty: bool = True


def commit_one_part(
    dataset_uri: str, fp: str, one: OnePart, *, stage: str, storage: StorageConfig | None = None
) -> Manifest:
    """Write `one` as part 0 of dataset `fp`, then its manifest (for a caller that has checked done-ness and hidden
    a stale manifest itself; `write_one_part_dataset` does the whole sequence)."""
    parts = []
    if one.table.num_rows or one.part_if_empty:
        part_funnel = one.funnel if one.funnel_in_part else None
        parts.append(write_part(dataset_uri, 0, one.table, fp, part_funnel, storage))
    return commit_dataset(
        dataset_uri,
        parts,
        one.schema if one.schema is not None else one.table.schema,
        fp,
        stage=stage,
        funnel=one.funnel,
        inputs=one.inputs,
        config=one.config,
        stats=one.stats,
        storage=storage,
    )


def write_one_part_dataset(
    dataset_uri: str,
    fp: str,
    build: Callable[[], OnePart],
    *,
    stage: str,
    storage: StorageConfig | None = None,
) -> str:
    """A dataset of one part, written once: free when dataset `fp` is already at `dataset_uri`; otherwise hide a
    stale manifest there, `build()` the rows (only now: it is the expensive part), write part 0 and commit.
    Returns `dataset_uri`."""
    if dataset_has_fingerprint(dataset_uri, fp, storage):
        return dataset_uri
    hide_stale_dataset(dataset_uri, fp, storage)
    commit_one_part(dataset_uri, fp, build(), stage=stage, storage=storage)
    return dataset_uri


def dataset_exists(dataset_uri: str, storage: StorageConfig | None = None) -> bool:
    """True when the dataset's manifest exists (the dataset is complete)."""
    fs, root = get_fs(dataset_uri, storage)
    with storage_call(dataset_uri, storage):
        return fs.exists(f"{root}/{MANIFEST_NAME}")


def dataset_has_fingerprint(dataset_uri: str, fp: str, storage: StorageConfig | None = None) -> bool:
    """True when a complete dataset of exactly this fingerprint is there: the step that writes it is done."""
    return dataset_exists(dataset_uri, storage) and read_manifest(dataset_uri, storage).fingerprint == fp


def hide_stale_dataset(dataset_uri: str, fp: str, storage: StorageConfig | None = None) -> None:
    """Before writing parts of dataset `fp` into a location: remove the manifest of another dataset there,
    so that no reader ever sees the old manifest listing parts that are being overwritten."""
    fs, root = get_fs(dataset_uri, storage)
    path = f"{root}/{MANIFEST_NAME}"
    if fs.exists(path) and read_manifest(dataset_uri, storage).fingerprint != fp:
        fs.rm(path)


def read_manifest(dataset_uri: str, storage: StorageConfig | None = None) -> Manifest:
    """The manifest of a complete dataset; a clear DatasetError when there is none."""
    fs, root = get_fs(dataset_uri, storage)
    path = f"{root}/{MANIFEST_NAME}"
    try:
        with storage_call(dataset_uri, storage), fs.open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise DatasetError(
            f"no dataset at {dataset_uri}: {MANIFEST_NAME} is missing (not written, or still being written)"
        ) from None
    try:
        return Manifest.from_json(text)
    except (ValueError, TypeError) as err:
        raise DatasetError(f"{dataset_uri}: corrupt {MANIFEST_NAME}: {err}") from None


def kept_rows(dataset_uri: str, storage: StorageConfig | None = None) -> int:
    """Rows of a complete dataset that its stage kept (its funnel's `kept`; every row when it has no funnel)."""
    return read_manifest(dataset_uri, storage).kept_rows


def read_part(
    dataset_uri: str, part: PartInfo, *, columns: Sequence[str] | None = None, storage: StorageConfig | None = None
) -> pa.Table:
    """One part a manifest (or a shard marker) lists, checked against its recorded row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, root = get_fs(dataset_uri, storage)
    try:
        with fs.open(f"{root}/{part.name}", "rb") as f:
            table = pq.read_table(f, columns=list(columns) if columns else None)
    except FileNotFoundError:
        raise DatasetError(f"{dataset_uri}: part {part.name} listed in the manifest is missing") from None
    except (pa.ArrowInvalid, OSError) as err:
        raise DatasetError(f"{dataset_uri}: cannot read part {part.name}: {err}") from None
    if table.num_rows != part.rows:
        raise DatasetError(f"{dataset_uri}: part {part.name} has {table.num_rows} rows, the manifest says {part.rows}")
    return table


def read_dataset(
    dataset_uri: str,
    *,
    columns: Sequence[str] | None = None,
    kept_only: bool = False,
    storage: StorageConfig | None = None,
) -> pa.Table:
    """Read the parts a manifest lists (never anything else) as one Arrow table.

    `kept_only` keeps rows whose `reject_reason` is null: what the next stage consumes.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    manifest = read_manifest(dataset_uri, storage)
    schema = manifest.arrow()
    tables = [read_part(dataset_uri, part, columns=columns, storage=storage) for part in manifest.parts]
    if columns:
        schema = pa.schema([schema.field(c) for c in columns])
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    if kept_only and table.num_rows:
        table = table.filter(pc.is_null(table.column("reject_reason")))
    return table


def peak_rss_mb() -> float:
    """Peak resident memory of this process (and its finished children), in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


def step_stats(name: str, results: list[ShardResult], wall_s: float) -> dict[str, Any]:
    """Throughput of one sharded step: rows, seconds of work, wall time, rows/s."""
    rows = sum(r.rows for r in results)
    work = sum(r.seconds for r in results)
    return {
        "step": name,
        "shards": len(results),
        "cached_shards": sum(r.cached for r in results),
        "rows": rows,
        "work_s": round(work, 3),
        "wall_s": round(wall_s, 3),
        "rows_per_s": round(rows / wall_s, 1) if wall_s > 0 else None,
    }
