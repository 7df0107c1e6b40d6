"""Run a function in a fresh spawned process and bring back its result or its exception.

GPU stages run their engine (vLLM, a training loop, a gradient pass) in a process of its own so that
its memory, CUDA context and worker processes are gone when it returns: nothing else reliably frees
a vLLM engine. `spawn` (not fork) because a forked CUDA or vLLM state is unusable, and because vLLM
must be created under `__main__` or in a spawned process (ENVIRONMENT.md).

The function and its arguments must be picklable (module-level functions, dataclasses). An exception
raised in the child is re-raised in the parent as itself when it pickles (so a ModelError stays a
ModelError for the CLI), else as SubprocessError with the child's traceback; a child that dies without
answering (killed, out of memory, segfault) is a SubprocessError naming its exit code.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class SubprocessError(RuntimeError):
    """The child process failed without a picklable exception, or died."""


def _die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies.

    A flow process killed mid-stage (SIGKILL, OOM, a lost worker) would otherwise leave its engine or training
    process running, holding gigabytes of RAM or a GPU that the re-run then lacks (seen here: an orphaned
    training process of a killed `scoder run` kept 8 GB and a core busy). vLLM's own processes below this one
    shut down when this one goes.
    """
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _child(conn, parent_pid: int, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    _die_with_parent(parent_pid)
    try:
        result = fn(*args, **kwargs)
        conn.send((True, result))
    except BaseException as err:  # everything goes back to the parent, which decides
        tb = traceback.format_exc()
        try:
            payload = pickle.dumps(err)
            pickle.loads(payload)
        except Exception:
            payload = None
        conn.send((False, (payload, tb, f"{type(err).__name__}: {err}")))
    finally:
        conn.close()


def run_in_subprocess(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) in a fresh spawned process; its result, or its exception re-raised here."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, os.getpid(), fn, args, kwargs), name=f"scoder-{fn.__name__}")
    proc.start()
    send.close()
    try:
        ok, payload = recv.recv()
    except EOFError:
        proc.join()
        raise SubprocessError(f"{fn.__name__} died in its subprocess (exit code {proc.exitcode})") from None
    finally:
        recv.close()
    proc.join()
    if ok:
        return payload
    pickled, tb, summary = payload
    if pickled is not None:
        err = pickle.loads(pickled)
        if isinstance(err, Exception):
            err.add_note(f"(raised in subprocess {fn.__name__})")
            raise err
    raise SubprocessError(f"{fn.__name__} failed in its subprocess: {summary}\n{tb}")


class TreeMemorySampler:
    """Peak memory of a process tree, sampled every `interval_s` in a background thread (a context manager).

    Sums PSS (shared pages split between the processes that map them, so libraries shared by the engine's
    processes are not counted once per process, as an RSS sum would). ru_maxrss cannot answer this: a
    spawned child inherits its parent's peak, and vLLM's engine core is a grandchild that is never reaped
    by the process that asks. `include_self` counts this process too (use it inside the engine process).
    """

    # 1 s: at 0.25 s the sampler was ~10% of an engine process's busy samples (py-spy, vLLM on the 2-core CPU:
    # reading each process's smaps_rollup), taken from generation; a stage's peak lasts longer than a second.
    def __init__(self, interval_s: float = 1.0, include_self: bool = False):
        import threading

        self.interval_s = interval_s
        self.include_self = include_self
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="tree-memory-sampler")

    def _loop(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            procs = me.children(recursive=True) + ([me] if self.include_self else [])
            total = 0
            for proc in procs:
                try:
                    total += proc.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass  # a process that exited between the listing and the read holds no memory any more
            self.peak_mb = max(self.peak_mb, total / 2**20)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
