"""The pool's sources: what a build reads, listed into units before anything is opened.

list_source_units expands the configured sources (local folders, globs, fsspec URIs, Parquet files, hf:NAME
datasets; default the running interpreter's standard library) into SourceUnits: a file, a row range of a Parquet
file, or a path the listing already rejected. Local folders are walked with os.scandir rather than fsspec's `find`
(which drops what it cannot list without a word): a FIFO, socket or device is `unreadable` (never opened), a file
name that is not UTF-8 is `undecodable_name`, a path over PATH_MAX is `path_too_long`, each one row. preflight
fails fast, with one clear line, on what would sink a whole build (a missing source or benchmark, a Parquet source
without the content column).

What it leaves to others: reading the units (read.py), sharding and fingerprints (plan.py).
"""

from __future__ import annotations

import fnmatch
import os
import stat
import sysconfig
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from synth_core.config import RunConfig
from synth_core.errors import ScoderError, describe
from synth_core.pool.reasons import PATH_TOO_LONG, UNDECODABLE_NAME, UNREADABLE
from synth_core.storage import file_stamp, fingerprint, get_fs, join_uri


def _path_max() -> int:
    """The longest path (bytes, with its NUL) the OS resolves: a longer one fails with ENAMETOOLONG."""
    try:
        return os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        return 4096  # Linux's PATH_MAX


PATH_MAX = _path_max()


class SourceError(ScoderError, ValueError):
    """A source cannot be used at all (missing path, offline hub dataset); the message names it."""


@dataclass(frozen=True)
class SourceUnit:
    """One thing an ingest shard reads: a source file, or a row range of a Parquet file; or a path the listing
    rejected (a FIFO, an undecodable name, a path over PATH_MAX), which becomes one row with its reason."""

    kind: str  # "file" | "parquet" | "rejected"
    uri: str
    size: int = 0  # bytes, from the listing (files)
    stamp: str = ""  # mtime/etag: the unit's part of the input fingerprint
    row_start: int = 0  # parquet: first row group
    row_end: int = -1  # parquet: one past the last row group (-1 = all of them)
    reject_reason: str | None = None  # "rejected": why the listing already rejected it (never opened)
    detail: str | None = None  # "rejected": what exactly


def default_sources() -> list[str]:
    """The running interpreter's standard library (site-packages excluded by the default `exclude`)."""
    return [sysconfig.get_paths()["stdlib"]]


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (or its type): library errors can span pages."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_hf_online(name: str) -> None:
    """A clear error instead of a hub time-out when the user has said there is no network."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):
            raise SourceError(f"Hugging Face dataset '{name}' needs network access, but {var} is set")


def _check_source_exists(fs, path: str, src: str) -> None:
    """A missing path or a glob matching nothing is an error (a dangling symlink exists: it is a row)."""
    if _is_glob(path):
        if not fs.glob(path):
            raise SourceError(f"source glob matches nothing: {src}")
    elif not fs.exists(path) and not os.path.islink(path):
        raise SourceError(f"source not found: {src}")


def _load_hf_source(name: str, cfg: RunConfig) -> str:
    """Materialise a Hugging Face dataset as one Parquet file under the work root; return its URI."""
    _check_hf_online(name)
    try:
        import datasets

        ds = datasets.load_dataset(name, split=cfg.pool.hf_split)
    except Exception as err:  # network, auth, missing dataset: one clear line, not a traceback
        raise SourceError(
            f"cannot load Hugging Face dataset '{name}' (split {cfg.pool.hf_split}): {first_line(err)}"
        ) from None
    if cfg.pool.content_column not in ds.column_names:
        raise SourceError(
            f"Hugging Face dataset '{name}' has no column '{cfg.pool.content_column}' (columns: {ds.column_names})"
        )
    uri = join_uri(cfg.storage.root, "sources", f"hf-{fingerprint(name, cfg.pool.hf_split, ds._fingerprint)}.parquet")
    fs, path = get_fs(uri, cfg.storage)
    if not fs.exists(path):
        fs.makedirs(fs._parent(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            ds.select_columns([cfg.pool.content_column]).to_parquet(f)
    return uri


def _parquet_units(uri: str, info: dict[str, Any], cfg: RunConfig) -> list[SourceUnit]:
    """Units of whole row groups of a Parquet file (about `shard_files * 64` rows each).

    A file whose footer cannot be read is one unit, rejected with the exact error at ingest.
    """
    import pyarrow.parquet as pq

    rows_per_unit = cfg.pool.shard_files * 64
    fs, path = get_fs(uri, cfg.storage)
    size, stamp = int(info.get("size") or 0), file_stamp(info)
    try:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
    except Exception:  # corrupt or unreadable: ingest records the exact error as a rejected row
        return [SourceUnit("parquet", uri, size, stamp)]
    check_content_column(uri, meta.schema.names, cfg)
    units, first, rows = [], 0, 0
    for g in range(meta.num_row_groups):
        rows += meta.row_group(g).num_rows
        if rows >= rows_per_unit or g == meta.num_row_groups - 1:
            units.append(SourceUnit("parquet", uri, size, stamp, first, g + 1))
            first, rows = g + 1, 0
    return units or [SourceUnit("parquet", uri, size, stamp, 0, 0)]


def check_content_column(uri: str, columns: list[str], cfg: RunConfig) -> None:
    """A Parquet source without the content column is a mistake in the run, not a bad row: one line, no retry."""
    column = cfg.pool.content_column
    if column not in columns:
        shown = ", ".join(columns[:20]) + (", ..." if len(columns) > 20 else "")
        raise SourceError(f"Parquet source {uri} has no column '{column}' (columns: {shown}); set pool.content_column")


def printable_path(path: str) -> str:
    """A path as valid UTF-8 text: bytes that are not UTF-8 (surrogate-escaped by os) become \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _rejected_unit(path: str, reason: str, detail: str) -> SourceUnit:
    return SourceUnit("rejected", printable_path(path), reject_reason=reason, detail=detail)


_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


def kind_of(mode: int) -> str:
    """What a file that is not a regular one is, in words (a FIFO, a socket, ...): a rejected row's detail."""
    return next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")


def _local_file_unit(path: str, cfg: RunConfig) -> list[SourceUnit]:
    """The unit(s) of one local path that the listing chose, or the row that says why it cannot be read.

    Never opens the path: a FIFO would block the shard forever, a device could stream without end.
    """
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return [_rejected_unit(path, UNDECODABLE_NAME, f"file name is not UTF-8: {printable_path(path)}")]
    size = len(os.fsencode(path))
    if size >= PATH_MAX:
        return [_rejected_unit(path, PATH_TOO_LONG, f"path of {size} bytes, over PATH_MAX ({PATH_MAX})")]
    try:
        st = os.stat(path)  # follows symlinks: a link to a good file is that file
    except OSError as err:
        return [_rejected_unit(path, UNREADABLE, describe(err))]
    if not stat.S_ISREG(st.st_mode):
        return [_rejected_unit(path, UNREADABLE, f"{kind_of(st.st_mode)}, not a regular file: not opened")]
    if path.lower().endswith(".parquet"):
        return _parquet_units(path, {"size": st.st_size, "mtime": st.st_mtime}, cfg)
    return [SourceUnit("file", path, st.st_size, str(st.st_mtime))]


def _wanted(name: str, path: str, cfg: RunConfig) -> bool:
    """A listed file is a source when its name matches an `include` glob and its path no `exclude` glob."""
    pcfg = cfg.pool
    return any(fnmatch.fnmatch(name, p) for p in pcfg.include) and not any(
        fnmatch.fnmatch(path, p) for p in pcfg.exclude
    )


def _pruned(folder: str, cfg: RunConfig) -> bool:
    """A folder that an exclude pattern ending in '*' matches is not walked: all its files would match it."""
    return any(p.endswith("*") and fnmatch.fnmatch(folder + "/", p) for p in cfg.pool.exclude)


# How deep the walk goes below a folder whose path is over PATH_MAX (one open directory fd per level).
MAX_LEVELS_PAST_PATH_MAX = 64


def _list_past_path_max(parent: str, name: str, cfg: RunConfig) -> list[SourceUnit]:
    """The files under `parent/name`, a folder whose path is over PATH_MAX, each one path_too_long row.

    Such a folder cannot be opened by its path, so it is walked through directory fds (opened relative to their
    parent); its files could not be read by any later step either, hence the rows. Symlinks are not followed.
    """
    units: list[SourceUnit] = []

    def walk(dir_fd: int, path: str, level: int) -> None:
        try:
            with os.scandir(dir_fd) as it:
                entries = list(it)
        except OSError as err:
            units.append(_rejected_unit(path, UNREADABLE, f"folder not listed: {describe(err)}"))
            return
        for entry in entries:
            child = f"{path}/{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                if _pruned(child, cfg):
                    continue
                if level >= MAX_LEVELS_PAST_PATH_MAX:
                    detail = f"folder nested over {MAX_LEVELS_PAST_PATH_MAX} levels past PATH_MAX: not walked"
                    units.append(_rejected_unit(child, PATH_TOO_LONG, detail))
                    continue
                try:
                    fd = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd)
                except OSError as err:
                    units.append(_rejected_unit(child, UNREADABLE, f"folder not listed: {describe(err)}"))
                    continue
                try:
                    walk(fd, child, level + 1)
                finally:
                    os.close(fd)
            elif _wanted(entry.name, child, cfg):
                size = len(os.fsencode(child))
                units.append(_rejected_unit(child, PATH_TOO_LONG, f"path of {size} bytes, over PATH_MAX ({PATH_MAX})"))

    try:
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)
    except OSError as err:
        return [_rejected_unit(f"{parent}/{name}", UNREADABLE, f"folder not listed: {describe(err)}")]
    try:
        walk(fd, f"{parent}/{name}", 1)
    finally:
        os.close(fd)
    return units


def _walk_local_folder(root: str, cfg: RunConfig) -> list[SourceUnit]:
    """Every file under a local folder whose name matches `include` (and whose path no `exclude` matches).

    Walked with os.scandir rather than fsspec's `find`, which skips without a word what it cannot list or stat
    (a path over PATH_MAX, a folder without permission): here each of those is a row. Symlinked folders are
    followed once (a link loop is not walked twice).
    """
    units: list[SourceUnit] = []
    seen: set[tuple[int, int]] = set()
    stack = [root.rstrip("/") or "/"]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as err:
            units.append(_rejected_unit(folder, UNREADABLE, f"folder not listed: {describe(err)}"))
            continue
        for entry in entries:
            path = entry.path
            try:
                is_dir = entry.is_dir()
            except OSError:  # a link whose target cannot be resolved: the file check below says why
                is_dir = False
            if is_dir:
                if _pruned(path, cfg):
                    continue
                if len(os.fsencode(path)) >= PATH_MAX:
                    units.extend(_list_past_path_max(folder, entry.name, cfg))
                else:
                    stack.append(path)
                continue
            if _wanted(entry.name, path, cfg):
                units.extend(_local_file_unit(path, cfg))
    return units


def list_source_units(cfg: RunConfig) -> list[SourceUnit]:
    """Expand the configured sources into units, sorted within each source; a missing source is an error."""
    pcfg = cfg.pool
    units: list[SourceUnit] = []
    for src in pcfg.sources or default_sources():
        if src.startswith("hf:"):
            uri = _load_hf_source(src[3:], cfg)
            fs, path = get_fs(uri, cfg.storage)
            units.extend(_parquet_units(uri, fs.info(path), cfg))
            continue
        fs, path = get_fs(src, cfg.storage)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]

        def to_uri(p: str, protocol: str = protocol) -> str:
            return p if protocol in ("file", "local") else f"{protocol}://{p}"

        _check_source_exists(fs, path, src)
        local = protocol in ("file", "local")
        if local and not _is_glob(path) and os.path.isdir(path):
            units.extend(sorted(_walk_local_folder(path, cfg), key=lambda u: (u.uri, u.row_start)))
            continue
        if _is_glob(path):
            entries = fs.glob(path, detail=True)
        elif fs.isdir(path):
            entries = {
                p: info
                for p, info in fs.find(path, detail=True).items()
                if any(fnmatch.fnmatch(PurePosixPath(p).name, pat) for pat in pcfg.include)
            }
        else:
            entries = {path: fs.info(path)} if fs.exists(path) else {path: {"type": "other", "size": 0}}
        entries = {
            p: info
            for p, info in entries.items()
            if info.get("type") != "directory" and not any(fnmatch.fnmatch(p, pat) for pat in pcfg.exclude)
        }
        for p in sorted(entries):
            info = entries[p]
            if local:  # a glob or a single path: the same checks as a folder's files (FIFOs, names, lengths)
                units.extend(_local_file_unit(p, cfg))
            elif p.lower().endswith(".parquet"):
                units.extend(_parquet_units(to_uri(p), info, cfg))
            else:
                units.append(SourceUnit("file", to_uri(p), int(info.get("size") or 0), file_stamp(info)))
    return units


def _check_parquet_columns(fs, path: str, cfg: RunConfig) -> None:
    """The content column of a source that is a Parquet file (or a glob of them): a footer read each."""
    import pyarrow.parquet as pq

    paths = fs.glob(path) if _is_glob(path) else [path]
    for p in paths:
        if not p.lower().endswith(".parquet") or not fs.isfile(p):
            continue
        try:
            with fs.open(p, "rb") as f:
                names = pq.ParquetFile(f).schema_arrow.names
        except Exception:  # corrupt or unreadable: ingest records the exact error as a rejected row
            continue
        check_content_column(p, names, cfg)


def preflight(cfg: RunConfig) -> None:
    """Fail fast, with one clear line, on what would sink a whole build: a missing source or benchmark, a
    Parquet source without the content column.

    Cheap (no file is read beyond the benchmarks); run before an orchestrator starts any task.
    """
    from synth_core.decontam import load_benchmark

    for src in cfg.pool.sources:
        if src.startswith("hf:"):
            _check_hf_online(src[3:])
            continue
        fs, path = get_fs(src, cfg.storage)
        _check_source_exists(fs, path, src)
        _check_parquet_columns(fs, path, cfg)
    for spec in cfg.decontam.benchmarks:
        load_benchmark(spec, cfg.storage)
