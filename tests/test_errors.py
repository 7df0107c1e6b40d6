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


def test_a_wrapper_is_as_permanent_as_its_cause():
    """storage_call wraps a failed storage call in a StorageError (a RuntimeError) naming the URI: an ENOSPC inside
    is still permanent, a refused connection inside still transient; an exception may also say for itself."""
    from synth_core.storage import StorageError

    def wrapped(cause: BaseException) -> BaseException:
        try:
            raise cause
        except BaseException as err:
            try:
                raise StorageError(f"s3://bucket/out: {err}") from err
            except StorageError as wrapper:
                return wrapper

    assert is_permanent(wrapped(OSError(errno.ENOSPC, "No space left on device")))
    assert not is_permanent(wrapped(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")))
    assert not is_permanent(StorageError("s3://bucket/out: read timed out"))
    flagged = StorageError("no S3 credentials for s3://bucket/out")
    flagged.permanent = True
    assert is_permanent(flagged)


def test_missing_s3_credentials_are_permanent(monkeypatch):
    from synth_core import storage

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no network call to instance metadata
    monkeypatch.setattr(storage.fs, "_FOUND_AWS_CREDENTIALS", False)  # the module whose global get_fs reads
    with pytest.raises(storage.StorageError, match="no S3 credentials") as info:
        storage.get_fs("s3://bucket/out")
    assert is_permanent(info.value)


def test_describe_does_not_repeat_a_cause_the_message_names():
    from synth_core.storage import StorageError

    def wrapped() -> None:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/full/part-0.parquet")
        except OSError as err:
            raise StorageError(f"/full: OSError: {err}") from err

    assert describe(_raised(wrapped)) == "/full: OSError: [Errno 28] No space left on device: '/full/part-0.parquet'"


def test_a_missing_dataset_is_permanent_and_a_storage_error_follows_its_cause():
    """A DatasetError (a missing or torn input) is not worth a retry; a StorageError without its own verdict is as
    permanent as the error it wraps (a refused connection stays transient)."""
    from synth_core.storage import DatasetError, StorageError

    assert is_permanent(DatasetError("no dataset at s3://b/x"))
    try:
        raise StorageError("s3://b/x: cannot connect") from ConnectionRefusedError(111, "Connection refused")
    except StorageError as err:
        assert not is_permanent(err)


# Every error class the project defines, by name, with is_permanent of a plain instance as it was before ScoderError
# existed (pinned at be75e66): inheriting the base must change no verdict.
PERMANENCE = {
    "ConfigError": True,
    "SeedShortfallError": True,
    "PoolTooSmallError": True,
    "DatasetError": True,
    "StorageError": False,  # no verdict of its own and no cause: transient
    "WriterLockError": True,
    "TeacherError": False,
    "ReferenceSetError": True,
    "SourceError": True,
    "ReportError": True,
    "ScoreError": True,
    "BenchmarkError": True,
    "EvalError": True,
    "ModelError": True,
    "UnsetBenchmarkFileError": True,
    "DeployError": True,
    "SubprocessError": False,
    "InfluenceError": True,
}
# Not ScoderErrors on purpose: a child process's crash, whose message is its traceback (see ScoderError's docstring).
NOT_SCODER_ERRORS = {"SubprocessError"}


def _project_error_classes() -> dict[str, type[BaseException]]:
    """Every top-level `class ...Error` in synth_core, tasks and flows (found in the source, then imported)."""
    import ast
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = {}
    for pkg in ("synth_core", "tasks", "flows"):
        for path in sorted((root / pkg).rglob("*.py")):
            module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and node.name != "ScoderError":
                    found[node.name] = getattr(importlib.import_module(module), node.name)
    return found


def test_every_project_error_is_a_scoder_error_with_its_old_verdict():
    """The CLI catches ScoderError alone, so a new error class must be one (or say why not in NOT_SCODER_ERRORS);
    the base has no `permanent` attribute, so each class keeps the verdict its built-in base (or itself) gives."""
    from synth_core.errors import ScoderError

    classes = _project_error_classes()
    assert set(classes) == set(PERMANENCE), "list the new error class in PERMANENCE (and make it a ScoderError)"
    assert not hasattr(ScoderError, "permanent")
    for name, cls in classes.items():
        assert is_permanent(cls("x")) is PERMANENCE[name], name
        if name not in NOT_SCODER_ERRORS:
            assert issubclass(cls, ScoderError), name
    assert not issubclass(classes["SubprocessError"], ScoderError)
