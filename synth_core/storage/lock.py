"""The writer lock of an output location: one run writes there at a time, kept alive by a heartbeat thread.

What it leaves to others: the datasets written under the lock (dataset.py) and the filesystem calls (fs.py).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

from synth_core.config import StorageConfig
from synth_core.storage.fs import StorageError, get_fs, join_uri, write_bytes_atomic

LOCK_NAME = "_writer.lock"


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
        write_bytes_atomic(fs, path, json.dumps(self._record()).encode("utf-8"))

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
