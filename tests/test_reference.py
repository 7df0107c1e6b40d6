"""The reference set R: the built-in examples (every solution is run) and loading R from a user's JSONL/Parquet file.

The built-in solutions are our own trusted code (written for this project, standard library only), so each runs
in a plain `python -I` subprocess with an empty environment in tmp_path, not in a sandbox. Loading from S3 goes
through the real S3-compatible server of conftest.py (moto).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synth_core.config import StorageConfig
from synth_core.parse import extract_code, parse_synthesis
from synth_core.reference import (
    REFERENCE_SCHEMA,
    ReferenceSetError,
    builtin_reference_path,
    format_synthesis,
    load_reference,
    reference_messages,
)
from synth_core.schema import content_id

BUILTIN = load_reference().to_pylist()

INSTRUCTION = "Write a function `double(x: int) -> int` that returns twice its argument, for any integer."
RESPONSE = "Multiply by two.\n\n```python\ndef double(x):\n    return 2 * x\n\n\nassert double(3) == 6\n```"
GOOD = {"instruction": INSTRUCTION, "response": RESPONSE}
CHAT = [{"role": "user", "content": INSTRUCTION}, {"role": "assistant", "content": RESPONSE}]


# ---- the built-in set ----------------------------------------------------------------------------------------------


def test_builtin_set_loads_with_unique_ids_and_problems():
    table = load_reference()
    assert table.schema == REFERENCE_SCHEMA
    assert table.num_rows >= 40
    assert len(set(table.column("ref_id").to_pylist())) == table.num_rows
    assert len(set(table.column("instruction").to_pylist())) == table.num_rows
    assert set(table.column("source").to_pylist()) == {"builtin"}
    assert set(table.column("language").to_pylist()) == {"python"}
    assert builtin_reference_path().is_file()


def test_builtin_snippets_are_short_and_responses_have_one_python_block():
    for row in BUILTIN:
        assert 1 <= len(row["snippet"].strip("\n").splitlines()) <= 15, row["ref_id"]
        assert row["response"].count("```python\n") == 1 and row["response"].count("```") == 2, row["ref_id"]
        assert row["response"].rstrip().endswith("```"), row["ref_id"]
        assert "assert " in extract_code(row["response"]), row["ref_id"]


@pytest.mark.parametrize("row", BUILTIN, ids=[r["ref_id"] for r in BUILTIN])
def test_builtin_solution_passes_its_own_asserts(row, tmp_path):
    code = extract_code(row["response"])
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=10, cwd=tmp_path, env={}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_builtin_rows_parse_back_as_synthesis_outputs():
    """The parser and R agree: the answer format built from a row parses to the same instruction and response."""
    for row in BUILTIN:
        parsed = parse_synthesis(format_synthesis(row["instruction"], row["response"]))
        assert parsed.reject_reason is None, (row["ref_id"], parsed.detail)
        assert (parsed.instruction, parsed.response) == (row["instruction"], row["response"]), row["ref_id"]


def test_reference_messages_is_user_then_assistant():
    row = BUILTIN[0]
    assert reference_messages(row) == [
        {"role": "user", "content": row["instruction"]},
        {"role": "assistant", "content": row["response"]},
    ]


# ---- user files ----------------------------------------------------------------------------------------------------


def _write_jsonl(path, lines: list[str | dict]) -> str:
    path.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n", encoding="utf-8")
    return str(path)


def test_jsonl_file_round_trip_with_defaults(tmp_path):
    path = _write_jsonl(
        tmp_path / "refs.jsonl",
        [
            {"id": "dbl", "snippet": "y = x + x", "language": "python", **GOOD},
            "",  # blank lines are skipped
            {"instruction": INSTRUCTION + " Negative numbers too.", "response": RESPONSE, "teacher": "ignored"},
        ],
    )
    rows = load_reference(path).to_pylist()
    assert rows[0] == {
        "ref_id": "dbl",
        "snippet": "y = x + x",
        "language": "python",
        "instruction": INSTRUCTION,
        "response": RESPONSE,
        "source": f"{path}:1",
    }
    assert rows[1]["ref_id"] == content_id(INSTRUCTION + " Negative numbers too." + RESPONSE)
    assert (rows[1]["snippet"], rows[1]["language"], rows[1]["source"]) == ("", "python", f"{path}:3")


def test_parquet_file_round_trip(tmp_path):
    path = str(tmp_path / "refs.parquet")
    builtin = load_reference()
    pq.write_table(builtin, path)  # our own table: `ref_id` is accepted as the id column
    loaded = load_reference(path)
    assert loaded.drop_columns(["source"]).equals(builtin.drop_columns(["source"]))
    assert loaded.column("source").to_pylist()[:2] == [f"{path}#0", f"{path}#1"]


def test_chat_messages_rows(tmp_path):
    chat = CHAT
    system = [{"role": "system", "content": "You write programming problems."}]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}, {"id": "s", "messages": system + chat}])
    rows = load_reference(path).to_pylist()
    assert [(r["instruction"], r["response"]) for r in rows] == [(INSTRUCTION, RESPONSE)] * 2
    assert rows[0]["ref_id"] == content_id(INSTRUCTION + RESPONSE) and rows[1]["ref_id"] == "s"
    assert reference_messages(rows[0]) == chat
    # The same rows as Parquet (messages: list<struct<role, content>>).
    pq_path = str(tmp_path / "chat.parquet")
    pq.write_table(pa.Table.from_pylist([{"messages": chat, "snippet": "x = 1"}]), pq_path)
    (row,) = load_reference(pq_path).to_pylist()
    assert (row["instruction"], row["response"], row["snippet"]) == (INSTRUCTION, RESPONSE, "x = 1")


def test_reference_file_on_s3(s3_endpoint):
    from synth_core.storage import get_fs

    storage = StorageConfig(endpoint_url=s3_endpoint)
    uri = "s3://scoder/tests/reference/refs.jsonl"
    fs, path = get_fs(uri, storage)
    with fs.open(path, "wb") as f:
        f.write((json.dumps({"instruction": INSTRUCTION, "response": RESPONSE}) + "\n").encode())
    (row,) = load_reference(uri, storage=storage).to_pylist()
    assert (row["instruction"], row["source"]) == (INSTRUCTION, f"{uri}:1")
    with pytest.raises(ReferenceSetError, match="no such reference file"):
        load_reference("s3://scoder/tests/reference/missing.jsonl", storage=storage)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([GOOD, {"instruction": INSTRUCTION}], ":2: missing field 'response'"),
        ([{"instruction": "   ", "response": RESPONSE}], ":1: field 'instruction' is empty"),
        ([GOOD, {"instruction": INSTRUCTION, "response": 5}], ":2: field 'response' must be a string, got number"),
        ([{**GOOD, "snippet": ["x"]}], ":1: field 'snippet' must be a string, got array"),
        ([{**GOOD, "id": 1.5}], ":1: field 'id' must be a string or an integer, got number"),
        ([GOOD, "", '{"instruction": "unterminated'], ":3: not valid JSON"),
        (['["an", "array"]'], ":1: expected a JSON object, got array"),
        ([{**GOOD, "id": "a"}, {**GOOD, "id": "a", "response": RESPONSE + " "}], ":2: field 'id': duplicate id 'a'"),
        ([GOOD, GOOD], ":2: field 'id': duplicate example"),
        ([{"messages": CHAT[::-1]}], ":1: field 'messages' must be [system (optional), user, assistant]"),
        ([{"messages": [CHAT[0], {"role": "assistant"}]}], ":1: field 'messages[1].content' must be a string"),
        ([{"messages": CHAT, "response": RESPONSE}], ":1: has both 'messages' and 'instruction'/'response'"),
        ([], ": no examples"),
        (["", "  "], ": no examples"),
    ],
)
def test_bad_jsonl_file_names_the_line_and_field(tmp_path, lines, message):
    path = _write_jsonl(tmp_path / "refs.jsonl", lines)
    with pytest.raises(ReferenceSetError, match="^" + re.escape(path + message)):
        load_reference(path)


def test_duplicate_error_names_the_first_line(tmp_path):
    path = _write_jsonl(tmp_path / "refs.jsonl", [{**GOOD, "id": "a"}, GOOD, {**GOOD, "id": "a"}])
    message = f"{path}:3: field 'id': duplicate id 'a', first at {path}:1"
    with pytest.raises(ReferenceSetError, match=re.escape(message)):
        load_reference(path)


def test_bad_files_other_than_rows(tmp_path):
    with pytest.raises(ReferenceSetError, match=re.escape(f"{tmp_path}/nope.jsonl: no such reference file")):
        load_reference(str(tmp_path / "nope.jsonl"))
    (tmp_path / "refs.csv").write_text("instruction,response\n")
    with pytest.raises(ReferenceSetError, match="refs.csv: unknown reference file format"):
        load_reference(str(tmp_path / "refs.csv"))
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(GOOD).encode() + b'\n{"instruction": "caf\xe9"}\n')
    with pytest.raises(ReferenceSetError, match=r"latin1.jsonl:2: not UTF-8 text"):
        load_reference(str(tmp_path / "latin1.jsonl"))
    (tmp_path / "broken.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(ReferenceSetError, match="broken.parquet: not a readable Parquet file"):
        load_reference(str(tmp_path / "broken.parquet"))


def test_bad_parquet_row_names_the_row_and_field(tmp_path):
    path = str(tmp_path / "refs.parquet")
    pq.write_table(pa.Table.from_pylist([GOOD, {"instruction": INSTRUCTION, "response": None}]), path)
    with pytest.raises(ReferenceSetError, match=re.escape(f"{path}#1: missing field 'response'")):
        load_reference(path)
    pq.write_table(pa.Table.from_pylist([GOOD]).slice(0, 0), path)
    with pytest.raises(ReferenceSetError, match=re.escape(f"{path}: no examples")):
        load_reference(path)


# ---- datasets ------------------------------------------------------------------------------------------------------


def _dataset(uri: str, rows: list[dict], schema: pa.Schema | None = None, stage: str = "test") -> str:
    from synth_core.storage import commit_dataset, write_part

    table = pa.Table.from_pylist(rows, schema=schema)
    part = write_part(uri, 0, table, "fp")
    commit_dataset(uri, [part], table.schema, "fp", stage=stage)
    return uri


def test_dataset_folder_gives_its_kept_rows(tmp_path):
    """A dataset (e.g. `scoder reference build`'s, or the sample stage's) is read through its manifest; rejected rows
    are skipped and a row's source names its row among all rows."""
    rows = [
        {**GOOD, "ref_id": "r0", "snippet": "y = x + x", "reject_reason": None},
        {"instruction": None, "response": None, "ref_id": "r1", "snippet": "z", "reject_reason": "no_code_block"},
        {**GOOD, "instruction": INSTRUCTION + " Twice.", "ref_id": "r2", "snippet": None, "reject_reason": None},
    ]
    uri = _dataset(str(tmp_path / "R"), rows)
    loaded = load_reference(uri).to_pylist()
    assert [(r["ref_id"], r["snippet"], r["source"]) for r in loaded] == [
        ("r0", "y = x + x", f"{uri}#0"),
        ("r2", "", f"{uri}#2"),
    ]
    assert loaded[0]["instruction"] == INSTRUCTION and loaded[0]["language"] == "python"
    # Without ids (a samples dataset has sample_id, not ref_id): the content hash, as for files.
    plain = _dataset(str(tmp_path / "S"), [{**GOOD, "sample_id": "s", "reject_reason": None}])
    assert load_reference(plain).column("ref_id").to_pylist() == [content_id(INSTRUCTION + RESPONSE)]


def test_bad_datasets(tmp_path):
    no_kept = _dataset(str(tmp_path / "A"), [{**GOOD, "reject_reason": "too_long"}])
    with pytest.raises(ReferenceSetError, match=re.escape(f"{no_kept}: no examples (the dataset has no kept rows)")):
        load_reference(no_kept)
    pool = _dataset(str(tmp_path / "P"), [{"content": "x = 1", "reject_reason": None}], stage="pool")
    with pytest.raises(
        ReferenceSetError, match=re.escape(f"{pool}: a 'pool' dataset without the column 'instruction'")
    ):
        load_reference(pool)
    bad_row = _dataset(
        str(tmp_path / "B"), [GOOD | {"reject_reason": None}, {**GOOD, "response": " ", "reject_reason": None}]
    )
    with pytest.raises(ReferenceSetError, match=re.escape(f"{bad_row}#1: field 'response' is empty")):
        load_reference(bad_row)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ReferenceSetError, match="unknown reference file format .* or a dataset folder"):
        load_reference(str(tmp_path / "folder"))
