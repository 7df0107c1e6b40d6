"""Where datasets live: the filesystem of a local path or s3:// URI, with every S3 call bounded, and its errors.

What it leaves to others: what a dataset is (dataset.py) and who may write one (lock.py).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from synth_core.config import StorageConfig
from synth_core.errors import ScoderError, is_permanent

if TYPE_CHECKING:
    import fsspec


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


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a small file so that readers see all of it or nothing.

    Object stores publish a PUT atomically; on a local disk, write a temporary file and rename it.
    """
    if is_local(fs):
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # two writers' threads never share a temp name
        fs.makedirs(fs._parent(path), exist_ok=True)
        with fs.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
