"""The reference set R: trusted (seed snippet -> problem + solution) examples, built in or from a user's file.

R is what the bootstrap fine-tunes the first synthesizer on and where the influence stage takes its target
gradients from (DESIGN.md, method steps 1-3). A row holds a seed `snippet`, its `language`, the problem
(`instruction`) and the solution (`response`: a sentence and one fenced code block ending in asserts).

Where R comes from:
- `load_reference()` / `load_reference("reference:builtin")`: the built-in set, 96 examples written by hand for this
  project (varied topics, standard library only), so that everything runs offline: `prompts/reference.jsonl`, 48
  longer ones (20-78-line solutions with edge cases), then `prompts/reference_short.jsonl`, 48 short ones (a
  2-10-line function and 2-4 asserts). `reference:builtin-short` is the short half alone: what a 135M synthesizer
  can learn to imitate in a CPU-sized bootstrap (the embedded default's R; on the long ones it learned the format
  but wrote code too long to finish and asserts that failed). The test suite runs every solution.
- `load_reference("refs.jsonl" | "refs.parquet" | "s3://...")`: a user's JSONL or Parquet file. A row has
  `instruction` and `response` (required, non-empty strings), optional `snippet` (default ""), `language`
  (default "python") and `id` (alias `ref_id`; default: the content hash of instruction + response). A chat row
  (`messages`: an optional system message, then user = instruction, assistant = response) is accepted as well.
  Blank lines are skipped and unknown fields ignored.
- `load_reference("scoder-data/reference/FP" | "s3://...")`: a dataset folder (one with `_manifest.json`), such as
  the one `scoder reference build` writes (synth_core.reference_build): its kept rows (reject_reason null), the
  same fields; a row's `source` is `URI#ROW`, the 0-based row among all the dataset's rows.

A bad file is an error, never a silently shorter R: `ReferenceSetError` names the file, the 1-based line of a JSONL
file (`refs.jsonl:7: missing field 'response'`) or the 0-based row of a Parquet file (`refs.parquet#6: ...`, the
snippet pool's convention), and the field. Each loaded row's `source` says where it came from in the same form
(`builtin` for the built-in set).

Not here: building R from a teacher endpoint (synth_core.reference_build). Tokenising rows for training is the
train stage's job: it gets chat messages from `reference_messages`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import pyarrow as pa

# Moved to chat.py (issue 18); the name stays importable from here for its importers.
from synth_core.chat import format_synthesis as format_synthesis
from synth_core.errors import ScoderError
from synth_core.schema import content_id

if TYPE_CHECKING:
    from synth_core.config import StorageConfig

BUILTIN_SOURCE = "builtin"
BUILTIN_REFERENCE = "reference:builtin"  # every built-in example
BUILTIN_SHORT = "reference:builtin-short"  # the short built-in examples only
_BUILTIN_FILES = {
    BUILTIN_REFERENCE: ("reference.jsonl", "reference_short.jsonl"),
    BUILTIN_SHORT: ("reference_short.jsonl",),
}
DEFAULT_LANGUAGE = "python"


class ReferenceRow(TypedDict):
    """One example of the reference set."""

    ref_id: str  # the file's `id`, or the content hash of instruction + response
    snippet: str  # the seed snippet ("" when the file has none)
    language: str  # language of the snippet and the solution's code block
    instruction: str  # the problem statement
    response: str  # the solution: a sentence and one fenced code block with its asserts
    source: str  # "builtin", "FILE:LINE" (JSONL, 1-based) or "FILE#ROW" (Parquet, 0-based)


REFERENCE_SCHEMA = pa.schema(
    [
        pa.field("ref_id", pa.string(), nullable=False),
        pa.field("snippet", pa.string()),
        pa.field("language", pa.string()),
        pa.field("instruction", pa.string(), nullable=False),
        pa.field("response", pa.string(), nullable=False),
        pa.field("source", pa.string()),
    ]
)


class ReferenceSetError(ScoderError, ValueError):
    """A reference file cannot be used; the message names the file, the line (or Parquet row) and the field."""


def builtin_reference_path(name: str = "reference.jsonl") -> Path:
    """A file of the built-in reference set shipped in the package (synth_core/prompts/)."""
    return Path(str(resources.files("synth_core") / "prompts" / name))


def is_builtin(reference: str | None) -> bool:
    """True for None and the `reference:builtin...` names (not a file or dataset)."""
    return reference is None or reference in _BUILTIN_FILES


def load_reference(path: str | None = None, storage: StorageConfig | None = None) -> pa.Table:
    """R as a table of REFERENCE_SCHEMA: a built-in set (None or `reference:builtin` = all of it,
    `reference:builtin-short`), a .jsonl/.json/.parquet file or URI, or the kept rows of a dataset folder.

    `storage` gives the S3 endpoint and credentials for an s3:// path (synth_core.storage.get_fs).
    """
    empty = "the file is empty"
    if is_builtin(path):
        name = path or BUILTIN_REFERENCE
        located = []
        for file in _BUILTIN_FILES[name]:
            where = str(builtin_reference_path(file))
            records = _jsonl_records(Path(where).read_bytes(), where)
            located += [(f"{where}:{n}", BUILTIN_SOURCE, rec) for n, rec in records]
    else:
        name = path
        lower = path.lower()
        if lower.endswith((".jsonl", ".json")):
            records = _jsonl_records(_read_bytes(path, storage), path)
            located = [(f"{path}:{n}", f"{path}:{n}", rec) for n, rec in records]
        elif lower.endswith(".parquet"):
            located = [(f"{path}#{i}", f"{path}#{i}", rec) for i, rec in enumerate(_parquet_records(path, storage))]
        elif _is_dataset(path, storage):
            located = [(f"{path}#{i}", f"{path}#{i}", rec) for i, rec in _dataset_records(path, storage)]
            empty = "the dataset has no kept rows"
        else:
            raise ReferenceSetError(
                f"{path}: unknown reference file format (use .jsonl, .json, .parquet or a dataset folder)"
            )
    if not located:
        raise ReferenceSetError(f"{name}: no examples ({empty})")
    rows = []
    first_at: dict[str, str] = {}
    for where, source, record in located:
        row, id_given = _to_row(record, where, source)
        earlier = first_at.setdefault(row["ref_id"], where)
        if earlier != where:
            what = (
                f"duplicate id '{row['ref_id']}'" if id_given else "duplicate example (same instruction and response)"
            )
            raise ReferenceSetError(f"{where}: field 'id': {what}, first at {earlier}")
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=REFERENCE_SCHEMA)


def reference_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """The chat form of a reference row: the problem as the user turn, the solution as the assistant turn."""
    return [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["response"]}]


# ---- reading -------------------------------------------------------------------------------------------------------


def _read_bytes(path: str, storage: StorageConfig | None) -> bytes:
    from synth_core.storage import get_fs

    fs, fs_path = get_fs(path, storage)
    try:
        with fs.open(fs_path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ReferenceSetError(f"{path}: no such reference file") from None
    except OSError as err:
        raise ReferenceSetError(f"{path}: cannot read: {type(err).__name__}: {err}") from None


def _jsonl_records(data: bytes, name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for every non-blank line."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ReferenceSetError(f"{name}:{line}: not UTF-8 text") from None
    # split("\n"), not splitlines(): U+2028 and friends may stand raw inside a JSON string.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            hint = " (one JSON object per line is expected, not one array)" if line.lstrip().startswith("[") else ""
            message = f"{name}:{number}: not valid JSON: {err.msg} at column {err.colno}{hint}"
            raise ReferenceSetError(message) from None
        if not isinstance(record, dict):
            raise ReferenceSetError(f"{name}:{number}: expected a JSON object, got {_type_name(record)}")
        yield number, record


def _parquet_records(path: str, storage: StorageConfig | None) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    from synth_core.storage import get_fs

    fs, fs_path = get_fs(path, storage)
    try:
        with fs.open(fs_path, "rb") as f:
            table = pq.read_table(f)
    except FileNotFoundError:
        raise ReferenceSetError(f"{path}: no such reference file") from None
    except (pa.ArrowException, OSError) as err:
        raise ReferenceSetError(f"{path}: not a readable Parquet file: {err}") from None
    return table.to_pylist()


def _is_dataset(path: str, storage: StorageConfig | None) -> bool:
    from synth_core.storage import dataset_exists

    try:
        return dataset_exists(path, storage)
    except OSError:
        return False


def _dataset_records(path: str, storage: StorageConfig | None) -> list[tuple[int, dict[str, Any]]]:
    """(row among all rows, record) for the kept rows of a dataset whose rows have instruction and response."""
    from synth_core.storage import DatasetError, read_dataset, read_manifest

    try:
        manifest = read_manifest(path, storage)
        names = {f["name"] for f in manifest.schema}
        for needed in ("instruction", "response"):
            if needed not in names:
                raise ReferenceSetError(f"{path}: a '{manifest.stage}' dataset without the column '{needed}'")
        wanted = ("ref_id", "id", "snippet", "language", "instruction", "response", "messages", "reject_reason")
        table = read_dataset(path, columns=[c for c in wanted if c in names], storage=storage)
    except DatasetError as err:
        raise ReferenceSetError(str(err)) from None
    return [(i, rec) for i, rec in enumerate(table.to_pylist()) if rec.get("reject_reason") is None]


# ---- validation ----------------------------------------------------------------------------------------------------


def _to_row(record: dict[str, Any], where: str, source: str) -> tuple[ReferenceRow, bool]:
    """Validate one record (plain or chat form): (row, whether the record gave its id).

    `where` ("FILE:LINE" or "FILE#ROW") starts every error message.
    """
    if record.get("messages") is not None:
        if record.get("instruction") is not None or record.get("response") is not None:
            raise ReferenceSetError(f"{where}: has both 'messages' and 'instruction'/'response'; give one form")
        instruction, response = _from_messages(record["messages"], where)
    else:
        instruction = _required_text(record, "instruction", where)
        response = _required_text(record, "response", where)
    snippet = _optional_text(record, "snippet", where) or ""
    language = _optional_text(record, "language", where) or DEFAULT_LANGUAGE
    given_id = _ref_id(record, where)
    row = ReferenceRow(
        ref_id=given_id or content_id(instruction + response),
        snippet=snippet,
        language=language,
        instruction=instruction,
        response=response,
        source=source,
    )
    return row, given_id is not None


def _required_text(record: Mapping[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if value is None:
        raise ReferenceSetError(f"{where}: missing field '{key}'")
    if not isinstance(value, str):
        raise ReferenceSetError(f"{where}: field '{key}' must be a string, got {_type_name(value)}")
    if not value.strip():
        raise ReferenceSetError(f"{where}: field '{key}' is empty")
    return value


def _optional_text(record: Mapping[str, Any], key: str, where: str) -> str | None:
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise ReferenceSetError(f"{where}: field '{key}' must be a string, got {_type_name(value)}")
    return value


def _ref_id(record: Mapping[str, Any], where: str) -> str | None:
    present = [k for k in ("id", "ref_id") if record.get(k) is not None]
    if not present:
        return None
    if len(present) == 2 and str(record["id"]) != str(record["ref_id"]):
        raise ReferenceSetError(f"{where}: fields 'id' and 'ref_id' disagree; give one")
    key = present[0]
    value = record[key]
    # An integer id (common in exported datasets) is as good as its decimal string; a float or bool is a mistake.
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ReferenceSetError(f"{where}: field '{key}' must be a string or an integer, got {_type_name(value)}")
    if isinstance(value, str) and not value.strip():
        raise ReferenceSetError(f"{where}: field '{key}' is empty")
    return str(value)


def _from_messages(messages: Any, where: str) -> tuple[str, str]:
    """(instruction, response) from [system?, user, assistant] chat messages."""
    if not isinstance(messages, list):
        raise ReferenceSetError(f"{where}: field 'messages' must be an array, got {_type_name(messages)}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ReferenceSetError(f"{where}: field 'messages[{i}]' must be an object, got {_type_name(message)}")
        for key in ("role", "content"):
            value = message.get(key)
            if not isinstance(value, str):
                got = "missing" if value is None else f"a {_type_name(value)}"
                raise ReferenceSetError(f"{where}: field 'messages[{i}].{key}' must be a string, got {got}")
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    roles = [m["role"] for m in turns]
    if roles != ["user", "assistant"]:
        raise ReferenceSetError(
            f"{where}: field 'messages' must be [system (optional), user, assistant], got roles "
            f"{[m['role'] for m in messages]}"
        )
    for i, message in enumerate(messages):
        if not message["content"].strip() and message["role"] != "system":
            raise ReferenceSetError(f"{where}: field 'messages[{i}].content' ({message['role']}) is empty")
    return turns[0]["content"], turns[1]["content"]


def _type_name(value: Any) -> str:
    """The JSON name of a value's type, which is what a user sees in their file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
