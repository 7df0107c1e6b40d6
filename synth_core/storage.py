"""Datasets on local disk or object storage: parts, a manifest written last, fingerprints, funnels.

A dataset is a folder (local path or s3:// URI, through fsspec/s3fs) holding `part-NNNNN.parquet`
files and `_manifest.json`. The manifest is written LAST and lists the parts, their row counts, the
Arrow schema, the dataset's fingerprint, the code version and the funnel (rows in, kept, rejected per
reason). Readers read only what a manifest lists, so a crashed writer never exposes a partial dataset.

Shards write their part and then a small `_parts/part-NNNNN.json` marker; a re-run shard whose marker
exists is done. The commit step gathers the markers into the manifest. Parts without a manifest
entry are garbage.

This module knows nothing of stages or Prefect: it moves Arrow tables and JSON.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import resource
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from synth_core.config import StorageConfig
from synth_core.errors import ScoderError, is_permanent

if TYPE_CHECKING:
    import fsspec
    import pyarrow as pa

MANIFEST_NAME = "_manifest.json"
LOCK_NAME = "_writer.lock"
MARKERS_DIR = "_parts"
FORMAT_VERSION = 1


class DatasetError(ScoderError, RuntimeError):
    """A dataset is missing, incomplete or unreadable; the message names the URI."""

    # synth_core.errors.is_permanent: an input dataset that is missing or torn stays so on a retry (the stages
    # upstream of a task have finished before it starts), so a task does not wait out 70 s of backoff for it.
    permanent: bool | None = True


class StorageError(DatasetError):
    """Storage cannot be reached or written (dead endpoint, no credentials, read-only location); one line that
    names the URI and, for S3, the endpoint. A DatasetError, so every command that reports those reports this.

    `permanent` says whether a retry can help (synth_core.errors.is_permanent reads it): a time-out can pass, a
    missing bucket or credentials cannot; None leaves it to the error this one wraps (its `__cause__`). It survives
    pickling (a worker process's error reaches the flow).
    """

    def __init__(self, message: str, permanent: bool | None = None):
        super().__init__(message)
        self.permanent = permanent

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.permanent))


def file_stamp(info: dict[str, Any]) -> str:
    """What changes when a file changes, from an fsspec `info()`: its ETag or modification time ("" if none)."""
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def code_version() -> str:
    """The installed package version (recorded in every manifest)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scoder-factory")
    except PackageNotFoundError:
        return "0+unknown"


def get_fs(uri: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and in-filesystem path of `uri`.

    S3 endpoint and credentials come from `storage` when set, else from the standard AWS
    environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). The region is left to
    AWS_DEFAULT_REGION: passing region_name through client_kwargs breaks s3fs (ENVIRONMENT.md).

    Every S3 call is bounded by the storage config's connect/read timeouts and attempt cap: s3fs's own
    defaults (5 botocore attempts inside 5 s3fs retries) hung a build on a silent endpoint for over 5 minutes.
    Missing credentials are a StorageError here, before any call, instead of a NoCredentialsError traceback.
    """
    from fsspec.core import url_to_fs

    options: dict[str, Any] = {}
    is_s3 = uri.startswith(("s3://", "s3a://"))
    if is_s3:
        storage = storage or StorageConfig()
        endpoint = s3_endpoint(storage)
        if endpoint:
            options["endpoint_url"] = endpoint
        if storage.key:
            options["key"] = storage.key
        if storage.secret:
            options["secret"] = storage.secret
        if not (storage.key and storage.secret) and not _have_aws_credentials():
            # permanent: a task retrying this would wait 70 s for nothing
            raise StorageError(
                f"no S3 credentials for {uri} (endpoint {endpoint or 'AWS'}): set storage.key and storage.secret, "
                "or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or an AWS profile",
                permanent=True,
            )
        options["session"] = _s3_session()
        options["config_kwargs"] = {
            "connect_timeout": storage.connect_timeout_s,
            "read_timeout": storage.read_timeout_s,
            # total_max_attempts counts the first attempt; botocore's `max_attempts` would not (it sent 3).
            "retries": {"total_max_attempts": storage.max_attempts, "mode": "standard"},
        }
    fs, path = url_to_fs(uri, **options)
    if is_s3 and getattr(fs, "retries", 1) != 1:
        fs.retries = 1  # botocore's max_attempts is the one retry loop; s3fs would multiply it by its own 5
    return fs, path


_S3_SESSION: Any = None


def _s3_session() -> Any:
    """This process's aiobotocore session for s3fs, without the `Expect: 100-continue` header on uploads.

    botocore adds it to uploads of file-like bodies, and some S3-compatible servers and proxies never answer the
    100 they are asked for, which stalls the upload. One shared session per process keeps fsspec's instance cache
    working (its key includes the session)."""
    global _S3_SESSION
    if _S3_SESSION is None:
        from aiobotocore.session import AioSession

        session = AioSession()
        session.register("before-call.s3", _drop_expect_header)  # after botocore's add_expect_header
        _S3_SESSION = session
    return _S3_SESSION


def _drop_expect_header(params: dict[str, Any], **kwargs: Any) -> None:
    params.get("headers", {}).pop("Expect", None)


def s3_endpoint(storage: StorageConfig | None = None) -> str | None:
    """The S3 endpoint URL in use: the storage config's, else AWS_ENDPOINT_URL(_S3), else None (AWS itself)."""
    storage = storage or StorageConfig()
    return storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


_FOUND_AWS_CREDENTIALS = False


def _have_aws_credentials() -> bool:
    """Whether botocore's standard credential chain (environment, profile files, instance metadata) finds any.

    A found answer is kept for the process (instance metadata is a network call); a missing one is asked again.
    """
    global _FOUND_AWS_CREDENTIALS
    if not _FOUND_AWS_CREDENTIALS:
        import botocore.session

        _FOUND_AWS_CREDENTIALS = botocore.session.get_session().get_credentials() is not None
    return _FOUND_AWS_CREDENTIALS


def describe_storage_error(uri: str, err: BaseException, storage: StorageConfig | None = None) -> str:
    """One line for a failed storage call: the URI, the endpoint for S3, and what went wrong."""
    where = uri
    if uri.startswith(("s3://", "s3a://")):
        where = f"{uri} (endpoint {s3_endpoint(storage) or 'AWS'})"
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{where}: {type(err).__name__}: {detail}"


def _storage_failures() -> tuple[type[BaseException], ...]:
    """Exceptions of a failed storage call (not a missing file, which callers handle): OS and botocore errors."""
    errors: tuple[type[BaseException], ...] = (OSError, TimeoutError)
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += (BotoCoreError, ClientError)
    except ImportError:
        pass
    return errors


@contextlib.contextmanager
def storage_call(uri: str, storage: StorageConfig | None = None) -> Iterator[None]:
    """Turn a failed storage call (timeout, refused connection, denied write, full disk) into one StorageError
    line naming the URI and endpoint; a missing file and our own DatasetErrors pass through unchanged."""
    try:
        yield
    except (FileNotFoundError, DatasetError):
        raise
    except _storage_failures() as err:
        raise StorageError(describe_storage_error(uri, err, storage), permanent=is_permanent(err)) from err


def check_writable(uri: str, storage: StorageConfig | None = None) -> None:
    """Fail with one StorageError line unless a dataset can be written under `uri`: run before any work starts.

    Local: the path must be a folder (or creatable as one) that this user can write; a probe file proves it
    (a read-only mount passes os.access checks for root). S3: the bucket must exist and accept a small PUT
    within the configured timeouts; the probe object is deleted again.
    """
    probe_name = f".scoder-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if not uri.startswith(("s3://", "s3a://")) and "://" not in uri:
        path = os.path.abspath(uri)
        if os.path.exists(path) and not os.path.isdir(path):
            raise StorageError(f"cannot write to {uri}: it is an existing file, not a folder", permanent=True)
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, probe_name)
            with open(probe, "wb") as f:
                f.write(b"ok")
            os.remove(probe)
        except OSError as err:
            raise StorageError(f"cannot write to {uri}: {err.strerror or err}", permanent=is_permanent(err)) from None
        return
    fs, root = get_fs(uri, storage)
    probe = f"{root.rstrip('/')}/{probe_name}"
    try:
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except _storage_failures() as err:
        message = f"cannot write to {describe_storage_error(uri, err, storage)}"
        raise StorageError(message, permanent=is_permanent(err)) from None


def join_uri(base: str, *parts: str) -> str:
    """Join path segments onto a local path or URI with '/'."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


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


def _write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a small file so that readers see all of it or nothing.

    Object stores publish a PUT atomically; on a local disk, write a temporary file and rename it.
    """
    if _is_local(fs):
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # two writers' threads never share a temp name
        fs.makedirs(fs._parent(path), exist_ok=True)
        with fs.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


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
    if _is_local(fs):
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
    _write_bytes_atomic(fs, f"{root}/{MARKERS_DIR}/{index:05d}.json", json.dumps(asdict(info)).encode())
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
        _write_bytes_atomic(fs, f"{root}/{MANIFEST_NAME}", manifest.to_json().encode("utf-8"))
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


class WriterLockError(StorageError):
    """A live run holds the output location's writer lock; the message names it."""

    def __init__(self, message: str, permanent: bool = True):
        super().__init__(message, permanent)


class WriterLock:
    """`_writer.lock` in an output location: one run writes there at a time (a context manager).

    The lock holds its owner, pid, host, start and heartbeat times; a thread refreshes the heartbeat every
    `lock_heartbeat_s`. A lock whose heartbeat is older than `lock_stale_s`, or whose process on this host is
    gone (a SIGKILLed run), is stale and taken over. Otherwise the second writer waits up to `lock_wait_s`, then
    refuses with a WriterLockError naming the holder: two identical builds into one `--out` used to rewrite each
    other's parts in place.

    Taking a lock writes it and reads it back after a short settle: of two writers racing for a free lock, the
    one whose write landed last keeps it and the other sees a live holder. Object stores offer no portable
    create-if-absent, so this is the same protocol on local disks and S3.
    """

    SETTLE_S = 0.2

    def __init__(self, uri: str, storage: StorageConfig | None = None, owner: str = "scoder"):
        import socket
        import threading

        self.uri = uri
        self.storage = storage or StorageConfig()
        self.owner = owner
        self.host = socket.gethostname()
        self.token = uuid.uuid4().hex
        self.started_at = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path_uri(self) -> str:
        return join_uri(self.uri, LOCK_NAME)

    def _record(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "pid": os.getpid(),
            "host": self.host,
            "started_at": self.started_at,
            "heartbeat_at": time.time(),
            "token": self.token,
        }

    def _read(self) -> dict[str, Any] | None:
        fs, path = get_fs(self.path_uri, self.storage)
        try:
            with fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # a torn or foreign lock file: no heartbeat, so stale

    def _write(self) -> None:
        fs, path = get_fs(self.path_uri, self.storage)
        _write_bytes_atomic(fs, path, json.dumps(self._record()).encode("utf-8"))

    def _is_stale(self, holder: dict[str, Any]) -> bool:
        age = time.time() - float(holder.get("heartbeat_at") or 0)
        if age > self.storage.lock_stale_s:
            return True
        if holder.get("host") == self.host and isinstance(holder.get("pid"), int):
            return not _pid_alive(holder["pid"])  # its run died on this host: no need to wait out the heartbeat
        return False

    def describe(self, holder: dict[str, Any]) -> str:
        age = time.time() - float(holder.get("heartbeat_at") or 0)
        return (
            f"{self.uri} is being written by another run ({holder.get('owner', '?')}, pid {holder.get('pid', '?')} "
            f"on {holder.get('host', '?')}, heartbeat {age:.0f} s ago); wait for it to finish, or remove "
            f"{self.path_uri} if that run is gone"
        )

    def acquire(self) -> None:
        """Take the lock, waiting up to lock_wait_s for a live holder; WriterLockError when it stays held."""
        import threading

        deadline = time.monotonic() + self.storage.lock_wait_s
        while True:
            holder = self._read()
            if holder is None or holder.get("token") == self.token or self._is_stale(holder):
                self._write()
                time.sleep(self.SETTLE_S)
                holder = self._read()
                if holder is not None and holder.get("token") == self.token:
                    break
            if holder is not None and time.monotonic() >= deadline:
                raise WriterLockError(self.describe(holder))
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())) or self.SETTLE_S)
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="writer-lock-heartbeat")
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.storage.lock_heartbeat_s):
            try:
                holder = self._read()
                if holder is not None and holder.get("token") not in (None, self.token):
                    return  # taken over as stale (this process stalled past lock_stale_s): never overwrite the taker
                self._write()
            except Exception:  # a missed beat only ages the lock; the next one may succeed
                pass

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            holder = self._read()
            if holder is not None and holder.get("token") == self.token:
                fs, path = get_fs(self.path_uri, self.storage)
                fs.rm_file(path)
        except (FileNotFoundError, StorageError):
            pass

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
