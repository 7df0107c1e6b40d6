"""Run a function in a fresh process of its own and bring back its result or its exception.

GPU stages run their engine (vLLM, a training loop, a gradient pass) in a process of its own so that
its memory, CUDA context and worker processes are gone when it returns: nothing else reliably frees
a vLLM engine. Never a fork of the caller, because a forked CUDA or vLLM state is unusable, and because
vLLM must be created under `__main__` or in a fresh process (ENVIRONMENT.md).

On Linux the processes come from multiprocessing's `forkserver`: one clean server process, started from a
fresh interpreter on first use, imports torch, transformers, peft and vLLM once (`PRELOAD`; importing is all
it does: no CUDA context, no engine, no thread pool), and every stage process is a fork of that server. Each
`spawn` child used to import them itself: 6.4-6.7 s for a vLLM stage's imports, measured on the 2-core CPU,
against 0.02 s a fork once the server has them; a demo round starts about a dozen stage processes. A fork of
the server inherits the environment and working directory the server started with, so the child takes the
caller's current ones (`_child`), as a spawned child would. `SCODER_SUBPROCESS_START=spawn` goes back to
plain `spawn` (also the choice off Linux).

The function and its arguments must be picklable (module-level functions, dataclasses). An exception
raised in the child is re-raised in the parent as itself when it pickles (so a ModelError stays a
ModelError for the CLI), else as SubprocessError with the child's traceback; a child that dies without
answering (killed, out of memory, segfault) is a SubprocessError naming its exit code.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# What every stage process imports anyway; the forkserver imports each once (one it cannot import, such as vLLM
# on a GPU worker without it, is skipped by multiprocessing itself). These import no CUDA state: vLLM probes
# devices through NVML, which is fork-safe, and torch initialises CUDA only on first use.
PRELOAD = ["torch", "transformers", "peft", "vllm", "synth_core.sample", "synth_core.judge", "synth_core.train"]
START_ENV = "SCODER_SUBPROCESS_START"


class SubprocessError(RuntimeError):
    """The child process failed without a picklable exception, or died."""


def _die_with_parent(parent_pid: int) -> None:
    """Linux: have this process SIGKILLed when the caller dies.

    A flow process killed mid-stage (SIGKILL, OOM, a lost worker) would otherwise leave its engine or training
    process running, holding gigabytes of RAM or a GPU that the re-run then lacks (seen here: an orphaned
    training process of a killed `scoder run` kept 8 GB and a core busy). vLLM's own processes below this one
    shut down when this one goes.

    Two watches, because the caller is not always the direct parent: the kernel's PR_SET_PDEATHSIG fires when
    the direct parent dies (the caller under spawn, the forkserver under forkserver), and a daemon thread waits
    on a pidfd of the caller itself. The forkserver does not end with the caller while a child of it lives
    (each child holds the server's keep-alive pipe), so under forkserver only the pidfd sees the caller go.
    """
    import ctypes
    import select
    import signal
    import threading

    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    try:
        pidfd = os.pidfd_open(parent_pid)
    except ProcessLookupError:  # the caller died before this child got here
        os._exit(1)

    def wait_for_caller() -> None:
        select.select([pidfd], [], [])  # readable once the caller has exited
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=wait_for_caller, daemon=True, name="scoder-caller-watch").start()


def _child(
    conn, parent_pid: int, env: dict[str, str], cwd: str, fn: Callable[..., Any], args: tuple, kwargs: dict
) -> None:
    _die_with_parent(parent_pid)
    # A forkserver's fork has the server's environment and directory; the caller's count (a test's monkeypatched
    # variable, SCODER_VLLM_CPU_TOP_P, VLLM_CPU_KVCACHE_SPACE set by the caller).
    if dict(os.environ) != env:
        os.environ.clear()
        os.environ.update(env)
    if os.getcwd() != cwd:
        os.chdir(cwd)
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


def start_method() -> str:
    """'forkserver' on Linux unless SCODER_SUBPROCESS_START says otherwise, else 'spawn'."""
    method = os.environ.get(START_ENV) or ("forkserver" if sys.platform.startswith("linux") else "spawn")
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"{START_ENV}={method!r}: expected 'forkserver' or 'spawn'")
    return method


def _context() -> Any:
    method = start_method()
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)  # read when the server starts; a no-op once it runs
    return ctx


def run_in_subprocess(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) in a fresh process (see the module doc); its result, or its exception re-raised here."""
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    child_args = (send, os.getpid(), dict(os.environ), os.getcwd(), fn, args, kwargs)
    proc = ctx.Process(target=_child, args=child_args, name=f"scoder-{fn.__name__}")
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
