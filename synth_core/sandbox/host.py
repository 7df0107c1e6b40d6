"""The host side of one run, before and after the program: its uid slot, memory cgroup, mount plan, environment.

What it leaves to others: starting and reading the launcher (runner.py) and what happens inside the program's
process (launcher.py, which gets the mount plan built here as plain data).
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import logging
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from synth_core.config import SandboxConfig

log = logging.getLogger(__name__)

# Lock files of the uid slots. A fixed path, not tempfile.gettempdir(): two processes with different TMPDIRs
# must still see each other's locks, or they would run programs under the same uid and kill each other's.
SLOT_LOCK_DIR = Path("/tmp/scoder-sandbox-slots")
MAX_SLOTS = 1024
# World-writable folders replaced by a private tmpfs in the program's mount namespace.
SHARED_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
MAIN_FILE = "main.py"
MEMORY_CGROUP_OFF = "memory_cgroup: off (sandbox.memory_cgroup is null)"


def kill_uid_processes(uid: int) -> None:
    """Kill every process of `uid` from a short-lived process that becomes it (kill(-1) spares only itself)."""
    code = (
        "import os, signal\n"
        f"os.setgroups([]); os.setresgid({uid}, {uid}, {uid}); os.setresuid({uid}, {uid}, {uid})\n"
        "try:\n    os.kill(-1, signal.SIGKILL)\nexcept ProcessLookupError:\n    pass\n"
    )
    # Started as root (it must reach the interpreter), it switches uid itself before killing.
    subprocess.run([sys.executable, "-I", "-S", "-c", code], env={}, check=False, timeout=30)


def clean_env(workdir: Path) -> dict[str, str]:
    """The program's whole environment. No PYTHON* variables: `-I` ignores them (hence -B for bytecode)."""
    return {
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        # One BLAS/OpenMP thread: parallel runs already fill the cores, and each thread counts for max_procs.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def tmp_root(cfg: SandboxConfig) -> str:
    if cfg.tmp_root is None:
        return tempfile.gettempdir()
    os.makedirs(cfg.tmp_root, exist_ok=True)
    return cfg.tmp_root


@functools.cache
def interpreter_paths() -> list[str]:
    """Folders the program's interpreter must read: its binary's, the standard library's, the environment's."""
    paths = {
        os.path.dirname(os.path.realpath(sys.executable)),
        os.path.realpath(sysconfig.get_paths()["stdlib"]),
        os.path.realpath(sys.prefix),
    }
    return sorted(p for p in paths if os.path.isdir(p))


@functools.cache
def _interpreter_entry_paths() -> list[str]:
    """The interpreter's folders as the program names them (sys.executable's folder, sys.prefix), unresolved:
    a virtualenv's `bin/python` is a link, and the program starts through the link's own folder."""
    paths = {os.path.dirname(os.path.abspath(sys.executable)), os.path.abspath(sys.prefix), *interpreter_paths()}
    return sorted(p for p in paths if os.path.isdir(p))


@functools.cache
def _interpreter_mounts() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(closed folder, interpreter folders under it) for each folder others may not enter above the interpreter.

    Such a folder (pyenv under a 0700 /root) is replaced by an empty tmpfs in the program's mount namespace,
    with only the interpreter's folders bound back, so the sandbox uid reaches the interpreter and nothing else.
    """
    closed: dict[str, set[str]] = {}
    for path in interpreter_paths() + [os.path.realpath(sys.base_prefix)]:
        parts = Path(path).parts
        for i in range(1, len(parts)):
            folder = os.path.join(*parts[:i])
            if not os.stat(folder).st_mode & stat.S_IXOTH:
                closed.setdefault(folder, set()).add(path)
                break
    out = []
    for folder, keeps in sorted(closed.items()):
        # Bind the outermost ones only: a folder under another kept one comes with it.
        outer = sorted(k for k in keeps if not any(k != o and k.startswith(o + os.sep) for o in keeps))
        out.append((folder, tuple(outer)))
    return tuple(out)


def mount_plan(workdir: str, cfg: SandboxConfig, expose_interpreter: bool) -> dict:
    """What the launcher mounts in the program's namespace: `disk`, its one tmpfs (working folder, /tmp, /var/tmp,
    /dev/shm, with the folders of the interpreter that live in those bound back), and `closed`, (folder, kept
    folders) for each folder above the interpreter that the sandbox uid may not enter."""
    shared: list[tuple[str, str, list[str]]] = []
    seen: set[str] = set()
    for folder in SHARED_TMP_DIRS:
        real = os.path.realpath(folder)
        if real in seen or not os.path.isdir(real):
            continue
        seen.add(real)
        # The interpreter when it lives there (a virtualenv made in /tmp, as a CI checkout may be) is bound back;
        # everything else of the shared folder is hidden. (The working folder is bound last, over all of it.)
        keeps = [k for k in _interpreter_entry_paths() if k.startswith(real + os.sep)]
        keeps = [k for k in keeps if not any(k != o and k.startswith(o + os.sep) for o in keeps)]
        shared.append((real, folder.strip("/").replace("/", "_"), keeps))
    # max_file_mb for the largest file plus 1 MiB, so that the file-size limit, not the disk, stops a single file.
    disk = {"workdir": workdir, "main": MAIN_FILE, "size_mb": cfg.max_file_mb + 1, "shared": shared}
    closed = [(folder, list(keeps)) for folder, keeps in _interpreter_mounts()] if expose_interpreter else []
    return {"disk": disk, "closed": closed}


_cgroup_ids = itertools.count()


@contextmanager
def memory_cgroup(cfg: SandboxConfig) -> Iterator[tuple[str | None, str]]:
    """A cgroup v2 of this run's own under `cfg.memory_cgroup`, its memory.max = memory_mb and no swap, removed
    after the run; (its path, "") or (None, why there is none)."""
    if cfg.memory_cgroup is None:
        yield None, MEMORY_CGROUP_OFF
        return
    try:  # a plain folder would take the files below and bound nothing: check that it is a delegated cgroup v2
        delegated = "memory" in Path(cfg.memory_cgroup, "cgroup.subtree_control").read_text().split()
    except OSError:
        delegated = False
    if not delegated:
        yield None, f"memory_cgroup: {cfg.memory_cgroup} is no cgroup v2 with memory in its cgroup.subtree_control"
        return
    path = os.path.join(cfg.memory_cgroup, f"scoder-{os.getpid()}-{next(_cgroup_ids)}")
    try:
        os.mkdir(path)
    except OSError as err:
        yield None, f"memory_cgroup: cannot make a cgroup in {cfg.memory_cgroup}: {err}"
        return
    try:
        try:
            with open(os.path.join(path, "memory.max"), "r+") as f:  # r+: the kernel made it, we never create it
                f.write(f"{cfg.memory_mb * 2**20}\n")
            if os.path.exists(os.path.join(path, "memory.swap.max")):
                with open(os.path.join(path, "memory.swap.max"), "r+") as f:
                    f.write("0\n")
        except OSError as err:
            yield None, f"memory_cgroup: cannot set memory.max in {path}: {err}"
        else:
            yield path, ""
    finally:
        for _ in range(200):  # the launcher reaped every process of the run, but the kernel may lag a little
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)
        else:
            log.warning("sandbox: cannot remove the cgroup %s", path)


def oom_kills(cgroup: str) -> int:
    """How many processes of the run the kernel killed at its cgroup's memory.max."""
    try:
        for line in Path(cgroup, "memory.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


@contextmanager
def uid_slot(cfg: SandboxConfig) -> Iterator[int | None]:
    """The uid this run uses, held exclusively (flock) until the run ends; None = no uid switch."""
    if cfg.uid_base is None or os.geteuid() != 0:
        yield None
        return
    SLOT_LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
    if SLOT_LOCK_DIR.stat().st_uid != 0:
        raise PermissionError(f"{SLOT_LOCK_DIR} is not owned by root: refusing its uid locks")
    while True:
        for slot in range(MAX_SLOTS):
            uid = cfg.uid_base + slot
            fd = os.open(SLOT_LOCK_DIR / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield uid
            finally:
                os.close(fd)  # releases the lock
            return
        time.sleep(0.01)  # every slot busy: wait for one


def sweep_shared_tmp(uid: int) -> None:
    """Remove what `uid` left at the top of the world-writable folders (only it can have made those entries)."""
    for folder in SHARED_TMP_DIRS:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, onerror=force_remove)
                else:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass


def force_remove(func: Callable[[str], object], path: str, exc_info: tuple) -> None:
    """rmtree's error hook: a folder the program made unreadable is opened up and removed; others are logged."""
    err = exc_info[1]
    if isinstance(err, FileNotFoundError):
        return
    if isinstance(err, PermissionError):
        try:
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            func(path)
            return
        except OSError:
            pass
    log.warning("sandbox: cannot remove %s: %s", path, err)
