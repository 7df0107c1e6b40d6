"""Which failures a retry can mend, and how to say any failure in one line.

`is_permanent(exc)` sorts an exception into permanent (bad input, a wrong config, a location that cannot be
written, missing credentials: the same call fails the same way every time) or transient (a connection reset,
a time-out, a worker that died: worth a retry with backoff). `describe(exc)` renders any exception as one line
that names its cause, for the CLI's `error:` line and for logs.

Unknown exception types count as transient, as before this module existed: a retry of a deterministic bug costs
a minute, while a transient failure treated as permanent fails a nightly run.

`ScoderError` is the one base of the errors the project raises on purpose (a wrong config, a missing dataset, an
unusable teacher): the CLI catches it as an expected failure, instead of a list of classes.

This module knows nothing of Prefect or of the CLI; tasks/retry.py and flows/cli/ use it. botocore is not
imported (its exceptions are recognised by module and name), so the check costs nothing where S3 is not used.
"""

from __future__ import annotations

import errno


class ScoderError(Exception):
    """Base of the errors this project raises on purpose: the message is written for the user, names what is wrong
    and says it all, so the CLI prints it as one `error: MESSAGE` line with status 2 and no traceback. Catch this
    class instead of a list of its subclasses.

    It says nothing about permanence (it has no `permanent` attribute): every subclass also derives from the built-in
    error it is, ValueError for bad input (permanent) or RuntimeError (its own `permanent` attribute or its cause
    decide), and is_permanent reads that, as it did before this base existed.

    procs.SubprocessError is deliberately not one: it reports a crash in a child process and its message holds the
    child's traceback, which the CLI reports through describe() (first line, status by is_permanent).
    """


# errnos of OSErrors that a retry cannot mend: a read-only file system, a full disk, a name that exists (a file
# where a folder should be) or does not, no permission, a name too long, a file where a folder is expected.
PERMANENT_ERRNOS = frozenset(
    {
        errno.EROFS,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EEXIST,
        errno.EACCES,
        errno.EPERM,
        errno.ENOENT,
        errno.ENAMETOOLONG,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ELOOP,
    }
)

# Exceptions of third-party libraries that are permanent, as (module prefix, class name): matched against the
# exception's MRO so that the libraries need not be imported.
_PERMANENT_FOREIGN = frozenset(
    {
        ("botocore", "NoCredentialsError"),
        ("botocore", "PartialCredentialsError"),
        ("botocore", "NoRegionError"),
        ("botocore", "ParamValidationError"),
        ("pyarrow", "ArrowInvalid"),
        ("pyarrow", "ArrowTypeError"),
        ("pyarrow", "ArrowNotImplementedError"),
    }
)

# OSError subclasses that say the same thing as a permanent errno, raised by libraries without an errno
# (s3fs raises PermissionError("Access Denied") and FileNotFoundError(path) with no errno).
_PERMANENT_OSERRORS = (PermissionError, FileExistsError, FileNotFoundError, IsADirectoryError, NotADirectoryError)

# Longest line describe() returns (characters): library messages can be pages long.
MAX_DESCRIBE_CHARS = 600


def _is_foreign_permanent(exc: BaseException) -> bool:
    for cls in type(exc).__mro__:
        root = cls.__module__.split(".")[0]
        if (root, cls.__name__) in _PERMANENT_FOREIGN:
            return True
    return False


def is_permanent(exc: BaseException) -> bool:
    """True when retrying cannot help: bad input (ValueError, KeyError, Arrow's invalid data), a permanent
    OSError (read-only, full, exists, missing, no permission, name too long), missing credentials.

    Connection errors and time-outs are transient, even though they are OSErrors too. An exception may say
    for itself (a `permanent` attribute, True or False, on its class or on the instance); one that wraps another
    (`raise StorageError(...) from err`) is permanent when what it wraps is.
    """
    return _is_permanent(exc, depth=0)


def _is_permanent(exc: BaseException, depth: int) -> bool:
    flag = getattr(exc, "permanent", None)
    if isinstance(flag, bool):
        return flag
    if _classify(exc):
        return True
    # A wrapper (a StorageError naming the URI around an ENOSPC) is as permanent as its cause; a few levels at most.
    cause = exc.__cause__
    return cause is not None and cause is not exc and depth < 5 and _is_permanent(cause, depth + 1)


def _classify(exc: BaseException) -> bool:
    """The exception's own type (and errno) alone."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return False
    if _is_foreign_permanent(exc):
        return True
    if isinstance(exc, ValueError | KeyError | IndexError):
        return True
    if isinstance(exc, _PERMANENT_OSERRORS):
        return True
    if isinstance(exc, OSError):
        return exc.errno in PERMANENT_ERRNOS
    return False


def _own(exc: BaseException) -> bool:
    """An error this project raises on purpose: its message is written for the user and says it all."""
    return type(exc).__module__.split(".")[0] in ("synth_core", "flows", "tasks")


def _message(exc: BaseException) -> str:
    """str(exc), which a broken __str__ must not turn into a second failure while reporting the first."""
    try:
        return str(exc)
    except Exception:
        return ""


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= MAX_DESCRIBE_CHARS else line[: MAX_DESCRIBE_CHARS - 3] + "..."


def _describe_os_error(exc: OSError) -> str:
    """`PATH: Read-only file system (EROFS)`, the form a shell user knows; falls back to the message."""
    if exc.strerror is None:
        return ""
    code = f" ({errno.errorcode[exc.errno]})" if exc.errno in errno.errorcode else ""
    where = exc.filename if exc.filename is not None else ""
    if isinstance(where, bytes):
        where = where.decode("utf-8", "backslashreplace")
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    return f"{where}: {exc.strerror}{code}" if where else f"{exc.strerror}{code}"


def describe(exc: BaseException) -> str:
    """One line naming what went wrong and, where the exception was raised from another, its cause.

    The project's own errors are their message; others are `Type: message` (a bare KeyError's message is just
    the key); an OSError with an errno reads `path: strerror (ENAME)`.
    """
    text = ""
    if isinstance(exc, OSError):
        text = _describe_os_error(exc)
    if not text:
        text = _one_line(_message(exc))
    if not _own(exc):
        name = type(exc).__name__
        text = f"{name}: {text}" if text else name
    cause = exc.__cause__ if exc.__cause__ is not None else None
    if cause is None and not exc.__suppress_context__:
        cause = exc.__context__
    if cause is not None and cause is not exc:
        inner = describe_shallow(cause)
        # A wrapper that already names its cause's type (storage's "URI: OSError: ...") needs no second mention.
        if inner and inner not in text and f"{type(cause).__name__}:" not in text:
            text = f"{text} (caused by {inner})"
    return _one_line(text) or type(exc).__name__


def describe_shallow(exc: BaseException) -> str:
    """describe() without following the cause chain any further (one level of cause is enough on one line)."""
    text = _describe_os_error(exc) if isinstance(exc, OSError) else ""
    text = text or _one_line(_message(exc))
    if not _own(exc):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text
