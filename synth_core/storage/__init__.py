"""Datasets on local disk or object storage: parts, a manifest written last, fingerprints, funnels.

A dataset is a folder (local path or s3:// URI, through fsspec/s3fs) holding `part-NNNNN.parquet`
files and `_manifest.json`. The manifest is written LAST and lists the parts, their row counts, the
Arrow schema, the dataset's fingerprint, the code version and the funnel (rows in, kept, rejected per
reason). Readers read only what a manifest lists, so a crashed writer never exposes a partial dataset.

Shards write their part and then a small `_parts/part-NNNNN.json` marker; a re-run shard whose marker
exists is done. The commit step gathers the markers into the manifest. Parts without a manifest
entry are garbage.

One module per concept; each imports only modules above it in this list:
- fs.py       the filesystem of a URI (local or s3://, every S3 call bounded), storage errors, check_writable,
              atomic small writes
- dataset.py  parts, done-markers, the manifest, fingerprints, funnels, one-part datasets, reading what a
              manifest lists
- lock.py     the writer lock of an output location and its heartbeat
This package re-exports every public name the single module synth_core/storage.py had: `synth_core.storage` is
the one entry point callers import from.

This package knows nothing of stages or Prefect: it moves Arrow tables and JSON.
"""

from synth_core.storage.dataset import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MARKERS_DIR,
    Manifest,
    OnePart,
    PartInfo,
    ShardResult,
    code_version,
    commit_dataset,
    commit_one_part,
    compute_funnel,
    dataset_exists,
    dataset_has_fingerprint,
    fingerprint,
    finished_shard,
    forget_shard,
    hide_stale_dataset,
    kept_rows,
    merge_funnels,
    part_name,
    peak_rss_mb,
    read_dataset,
    read_manifest,
    read_part,
    read_part_marker,
    step_stats,
    write_one_part_dataset,
    write_part,
)
from synth_core.storage.fs import (
    DatasetError,
    StorageError,
    check_writable,
    describe_storage_error,
    file_stamp,
    get_fs,
    join_uri,
    s3_endpoint,
    storage_call,
)
from synth_core.storage.lock import (
    LOCK_NAME,
    WriterLock,
    WriterLockError,
)

__all__ = [
    "DatasetError",
    "FORMAT_VERSION",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "MARKERS_DIR",
    "Manifest",
    "OnePart",
    "PartInfo",
    "ShardResult",
    "StorageError",
    "WriterLock",
    "WriterLockError",
    "check_writable",
    "code_version",
    "commit_dataset",
    "commit_one_part",
    "compute_funnel",
    "dataset_exists",
    "dataset_has_fingerprint",
    "describe_storage_error",
    "file_stamp",
    "fingerprint",
    "finished_shard",
    "forget_shard",
    "get_fs",
    "hide_stale_dataset",
    "join_uri",
    "kept_rows",
    "merge_funnels",
    "part_name",
    "peak_rss_mb",
    "read_dataset",
    "read_manifest",
    "read_part",
    "read_part_marker",
    "s3_endpoint",
    "step_stats",
    "storage_call",
    "write_one_part_dataset",
    "write_part",
]
