"""synth_core.errors: which failures are permanent, and the one line that describes any of them."""

from __future__ import annotations

import errno
import os

import pytest

from synth_core.config import ConfigError
from synth_core.errors import describe, is_permanent


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as err:
        return err
    raise AssertionError("expected an exception")


def test_real_permanent_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from botocore.exceptions import NoCredentialsError

    existing = tmp_path / "file"
    existing.write_text("x")
    errors = [
        _raised(lambda: os.mkdir(existing)),  # EEXIST
        _raised(lambda: open(tmp_path / "missing" / "x", "rb")),  # ENOENT
        _raised(lambda: os.stat(tmp_path / ("x" * 300))),  # ENAMETOOLONG
        _raised(lambda: open(existing / "child", "w")),  # ENOTDIR
        _raised(lambda: {}["content"]),
        _raised(lambda: int("x")),
        _raised(lambda: pa.array(["x"]).cast(pa.int64())),  # ArrowInvalid
        _raised(lambda: pa.table({"a": [1]}).cast(pa.schema([("a", pa.list_(pa.int64()))]))),
        _raised(lambda: pq.read_table(existing)),  # not Parquet: ArrowInvalid
        NoCredentialsError(),
        ConfigError("unknown key 'pool.snipets'"),
        OSError(errno.EROFS, "Read-only file system", "/ro"),
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EACCES, "Permission denied", "/root/x"),
        PermissionError("Access Denied"),  # s3fs: no errno
    ]
    for err in errors:
        assert is_permanent(err), repr(err)


def test_transient_errors():
    errors = [
        ConnectionError("reset"),
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        TimeoutError("timed out"),
        OSError("storage hiccup"),
        OSError(errno.EIO, "Input/output error"),
        RuntimeError("engine died"),
    ]
    for err in errors:
        assert not is_permanent(err), repr(err)


@pytest.mark.parametrize(
    "err, line",
    [
        (ConfigError("config: unknown key 'pool.snipets'"), "config: unknown key 'pool.snipets'"),
        (KeyError("content"), "KeyError: 'content'"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/out"), "OSError: /ro/out: Read-only file system (EROFS)"),
        (RuntimeError("first line\n  second line"), "RuntimeError: first line"),
    ],
)
def test_describe_is_one_line(err, line):
    assert describe(err) == line


def test_describe_names_the_cause():
    def inner() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/full/part-0.parquet")

    def outer() -> None:
        try:
            inner()
        except OSError as err:
            raise RuntimeError("writing part 0 failed") from err

    line = describe(_raised(outer))
    cause = "OSError: /full/part-0.parquet: No space left on device (ENOSPC)"
    assert line == f"RuntimeError: writing part 0 failed (caused by {cause})"
    assert "\n" not in describe(_raised(outer))


def test_cli_reports_a_failure_as_one_line(capsys):
    """flows.cli.report_error, what `scoder` does with a failure no command caught: one line, the exit status."""
    from flows.cli import report_error

    assert report_error(OSError(errno.EROFS, "Read-only file system", "/ro/out")) == 2
    assert capsys.readouterr().err == "error: OSError: /ro/out: Read-only file system (EROFS)\n"
    assert report_error(RuntimeError("engine died\nlong details")) == 1
    assert capsys.readouterr().err == "error: RuntimeError: engine died (SCODER_DEBUG=1 shows the traceback)\n"


def test_describe_survives_a_broken_message():
    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no message")

    assert describe(Broken()) == "Broken"
