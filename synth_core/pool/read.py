"""Reading one source unit into documents: a local file opened non-blocking and checked after opening (a path
swapped for a FIFO since the listing raises instead of blocking), a remote file through fsspec, a Parquet row
range. Read failures become rejected documents, never exceptions; only a Parquet source without the content column
fails the run.

What it leaves to others: the listing (sources.py), filtering and cutting (documents.py).
"""

from __future__ import annotations

import os
import stat

from synth_core.config import RunConfig
from synth_core.errors import describe
from synth_core.pool.documents import Document, language_of
from synth_core.pool.reasons import EMPTY, TOO_LARGE, UNREADABLE
from synth_core.pool.sources import SourceError, SourceUnit, check_content_column, first_line, kind_of
from synth_core.storage import get_fs


def _read_local(path: str, limit: int) -> bytes:
    """Up to `limit` bytes of a local regular file. Opened non-blocking and checked after opening, so a path
    swapped for a FIFO or a device since the listing raises instead of blocking the shard."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"{kind_of(mode)}, not a regular file: not read")
        os.set_blocking(fd, True)
        chunks, left = [], limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_unit(unit: SourceUnit, cfg: RunConfig) -> list[Document]:
    """The documents of one unit; read failures become rejected documents, never exceptions."""
    if unit.kind == "rejected":
        return [Document(unit.uri, language_of(unit.uri), reject_reason=unit.reject_reason, detail=unit.detail)]
    fs, path = get_fs(unit.uri, cfg.storage)
    if unit.kind == "file":
        doc = Document(source=unit.uri, language=language_of(unit.uri))
        if unit.size > cfg.pool.max_file_bytes:
            doc.reject_reason, doc.detail = TOO_LARGE, f"{unit.size} bytes (limit {cfg.pool.max_file_bytes})"
            return [doc]
        local = "://" not in unit.uri
        try:
            # Read one byte past the limit: the listing's size can be stale.
            if local:
                doc.raw = _read_local(path, cfg.pool.max_file_bytes + 1)
            else:
                with fs.open(path, "rb") as f:
                    doc.raw = f.read(cfg.pool.max_file_bytes + 1)
        except (OSError, ValueError) as err:
            doc.reject_reason, doc.detail = UNREADABLE, describe(err)
            return [doc]
        if len(doc.raw) > cfg.pool.max_file_bytes:
            doc.raw = None
            doc.reject_reason, doc.detail = TOO_LARGE, f"over {cfg.pool.max_file_bytes} bytes"
        return [doc]
    import pyarrow.parquet as pq

    column = cfg.pool.content_column
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            # Outside the except below: a missing column fails the run (one line), it is not a bad row.
            check_content_column(unit.uri, pf.schema_arrow.names, cfg)
            groups = range(pf.metadata.num_row_groups) if unit.row_end < 0 else range(unit.row_start, unit.row_end)
            first_row = sum(pf.metadata.row_group(g).num_rows for g in range(groups.start if groups else 0))
            table = pf.read_row_groups(list(groups), columns=[column])
    except SourceError:
        raise
    except Exception as err:  # corrupt file: the whole unit is one rejected row
        detail = f"Parquet: {type(err).__name__}: {first_line(err)}"
        return [Document(unit.uri, "text", reject_reason=UNREADABLE, detail=detail)]
    docs = []
    for i, value in enumerate(table.column(column).to_pylist()):
        doc = Document(f"{unit.uri}#{first_row + i}", "python")
        if isinstance(value, bytes):
            doc.raw = value
        elif isinstance(value, str):
            doc.text = value
        elif value is None:
            doc.reject_reason, doc.detail = EMPTY, f"null {column}"
        else:
            doc.reject_reason, doc.detail = UNREADABLE, f"{column} is {type(value).__name__}, not text"
        docs.append(doc)
    return docs
