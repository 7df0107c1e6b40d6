"""Run programs in the sandbox: run_program / run_programs / probe_sandbox, the thread that starts the launcher,
reads its pipes and turns its report into a SandboxResult.

What it leaves to others: the launcher's own work (launcher.py) and the host-side resources of a run (host.py).
"""

from __future__ import annotations

import dataclasses
import logging
import marshal
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from synth_core.config import SandboxConfig
from synth_core.sandbox.host import (
    MAIN_FILE,
    MAX_SLOTS,
    MEMORY_CGROUP_OFF,
    clean_env,
    force_remove,
    interpreter_paths,
    kill_uid_processes,
    memory_cgroup,
    mount_plan,
    oom_kills,
    sweep_shared_tmp,
    tmp_root,
    uid_slot,
)
from synth_core.sandbox.launcher import LAUNCHER_STUB, launcher_code
from synth_core.sandbox.result import PARENT_PROTECTIONS, PROTECTIONS, SandboxResult

log = logging.getLogger(__name__)

# Beyond timeout_s, how long the launcher gets to start, clean up and report before we kill it ourselves.
GRACE_S = 5.0
# How long the launcher keeps killing a program's leftovers before it reports them as unkilled.
CLEANUP_S = 2.0
# After the launcher exits, how long we still read pipes that a process it could not kill holds open.
DRAIN_S = 0.5
STATUS_MAX_BYTES = 65536
READ_CHUNK = 65536


def run_program(code: str, cfg: SandboxConfig | None = None, args: Sequence[str] = ()) -> SandboxResult:
    """Run `code` as a Python program in the sandbox (argv[1:] = args); how it ended."""
    cfg = cfg or SandboxConfig()
    with uid_slot(cfg) as uid, memory_cgroup(cfg) as (cgroup, cgroup_off):
        workdir = Path(tempfile.mkdtemp(prefix="scoder-sbx-", dir=tmp_root(cfg)))
        try:
            main = workdir / MAIN_FILE
            main.write_text(code, encoding="utf-8", errors="surrogatepass")
            if uid is not None:
                os.chown(workdir, uid, uid)
                os.chown(main, uid, uid)
            result = _execute(workdir, uid, cfg, list(args), cgroup, cgroup_off)
            if cgroup and result.signal == "SIGKILL" and result.limit is None and oom_kills(cgroup):
                result = dataclasses.replace(result, limit="memory")
            if uid is not None and "private_tmp" not in result.protections:
                sweep_shared_tmp(uid)  # what it left in /tmp & co. would otherwise outlive it
        finally:
            shutil.rmtree(workdir, onerror=force_remove)
    _warn_inactive(result)
    return result


def run_programs(
    codes: Sequence[str], cfg: SandboxConfig | None = None, args: Sequence[str] = ()
) -> list[SandboxResult]:
    """Run every program in the sandbox, `cfg.workers` at once (None = CPU cores); results in input order."""
    cfg = cfg or SandboxConfig()
    workers = min(cfg.workers or os.cpu_count() or 1, MAX_SLOTS, max(len(codes), 1))
    if workers == 1:
        return [run_program(code, cfg, args) for code in codes]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda code: run_program(code, cfg, args), codes))


def probe_sandbox(cfg: SandboxConfig | None = None) -> SandboxResult:
    """Run an empty program: its result says which protections this machine gives (and why not the others)."""
    return run_program("pass\n", cfg)


# ---------------------------------------------------------------------------------------------------------
# This side: one thread per run starts the launcher, reads its pipes and turns its report into a result.


class _Tail:
    """The last `keep` bytes written to a stream, and how many were written in all."""

    def __init__(self, keep: int):
        self.keep = keep
        self.total = 0
        self.buf = bytearray()

    def add(self, data: bytes) -> None:
        self.total += len(data)
        self.buf += data
        if len(self.buf) > 2 * self.keep + READ_CHUNK:  # trim now and then, not on every read
            del self.buf[: len(self.buf) - self.keep]

    def text(self) -> str:
        data = self.buf[max(len(self.buf) - self.keep, 0) :] if self.keep else b""
        return bytes(data).decode("utf-8", errors="replace")


def _execute(
    workdir: Path, uid: int | None, cfg: SandboxConfig, args: list[str], cgroup: str | None, cgroup_off: str
) -> SandboxResult:
    env = clean_env(workdir)
    status_r, status_w = os.pipe()
    spec = {
        "status_fd": status_w,
        "timeout_s": cfg.timeout_s,
        "cpu_s": cfg.cpu_s,
        "memory_bytes": cfg.memory_mb * 2**20,
        "fsize_bytes": cfg.max_file_mb * 2**20,
        "nproc": cfg.max_procs,
        "uid": uid,
        "gid": uid,
        "netns": cfg.network == "deny",
        "mounts": mount_plan(str(workdir), cfg, expose_interpreter=uid is not None) if os.geteuid() == 0 else {},
        "nofile": cfg.max_open_files,
        "cgroup": cgroup,
        "cgroup_off": cgroup_off,
        "must_reach": interpreter_paths(),
        "workdir": str(workdir),
        "required": [p for p in cfg.required if p not in PARENT_PROTECTIONS],
        "cleanup_s": CLEANUP_S,
        "argv": [sys.executable, "-I", "-B", MAIN_FILE, *args],
    }
    # -S: the launcher needs no site-packages, which saves ~15 ms a run; the program gets them (no -S).
    argv = [sys.executable, "-I", "-S", "-B", "-c", LAUNCHER_STUB, launcher_code(), marshal.dumps(spec).hex()]
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=env,
            start_new_session=True,
            pass_fds=(status_w,),
        )
    except OSError as err:
        os.close(status_r)
        return _error_result(f"cannot start the launcher: {err}")
    finally:
        os.close(status_w)
    out, err, status = _Tail(cfg.tail_bytes), _Tail(cfg.tail_bytes), _Tail(STATUS_MAX_BYTES)
    assert proc.stdout is not None and proc.stderr is not None
    streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err, status_r: status}
    stopped = backstop = False
    try:
        stopped, backstop = _pump(proc, streams, out, err, cfg)
    finally:
        # The launcher is not reaped yet (WNOWAIT), so its pid, which is its process group's id, is still ours.
        _killpg(proc.pid)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        os.close(status_r)
    report = _parse_status(bytes(status.buf))
    if uid is not None and ("outcome" not in report or report.get("unkilled")):
        kill_uid_processes(uid)  # the launcher died or gave up: kill what it could not
    return _result(report, out, err, proc.returncode, stopped, backstop, cfg)


def _pump(
    proc: subprocess.Popen, streams: dict[int, _Tail], out: _Tail, err: _Tail, cfg: SandboxConfig
) -> tuple[bool, bool]:
    """Read the pipes until they close; stop the program at the output cap. (stopped, backstop hit)."""
    poller = select.poll()  # not select.select: it fails on descriptors >= 1024
    for fd in streams:
        poller.register(fd, select.POLLIN)
    open_fds = set(streams)
    output_fds = {fd for fd, tail in streams.items() if tail is out or tail is err}
    backstop_at = time.monotonic() + cfg.timeout_s + GRACE_S
    drain_until: float | None = None
    stopped = False
    while open_fds:
        now = time.monotonic()
        if now >= backstop_at:
            return stopped, True
        if drain_until is not None and now >= drain_until:
            break  # the launcher is gone; whatever still holds a pipe open is not worth waiting for
        for fd, _ in poller.poll(min(backstop_at - now, 0.01 if stopped else 0.25) * 1000):
            data = os.read(fd, READ_CHUNK)
            if data:
                streams[fd].add(data)
            else:
                poller.unregister(fd)
                open_fds.discard(fd)
        if not stopped and out.total + err.total > cfg.max_output_bytes:
            stopped = True
            _signal(proc.pid, signal.SIGTERM)  # the launcher ends the program and reports "stopped"
            # Read no more until it has: with its pipe full, the program blocks instead of writing on (on 2 busy
            # cores it wrote 20 MB past a 2 MB cap before the launcher got to kill it).
            for fd in output_fds & open_fds:
                poller.unregister(fd)
        if drain_until is None and _exited(proc.pid):
            drain_until = time.monotonic() + DRAIN_S
            if stopped:
                for fd in output_fds & open_fds:
                    poller.register(fd, select.POLLIN)  # what is left: at most a pipe's capacity each
    return stopped, False


def _result(
    report: dict[str, list[str]],
    out: _Tail,
    err: _Tail,
    launcher_rc: int | None,
    stopped: bool,
    backstop: bool,
    cfg: SandboxConfig,
) -> SandboxResult:
    active = set(PARENT_PROTECTIONS)
    for line in report.get("active", []):
        active.update(p for p in line.split(",") if p)
    protections = tuple(p for p in PROTECTIONS if p in active)
    inactive = tuple(report.get("inactive", []))
    common = {
        "stdout_tail": out.text(),
        "stderr_tail": err.text(),
        "stdout_bytes": out.total,
        "stderr_bytes": err.total,
        "wall_s": float(_last(report, "wall_s") or 0.0),
        "protections": protections,
        "inactive": inactive,
        "leftover_procs": int(_last(report, "leftover") or 0),
    }
    outcome = _last(report, "outcome")
    setup_error = _last(report, "setup_error")
    if setup_error is not None:
        return SandboxResult("error", None, None, None, error=setup_error, **common)
    if outcome is None:
        why = f"no report within {cfg.timeout_s + GRACE_S:g} s" if backstop else f"exit status {launcher_rc}"
        return SandboxResult("error", None, None, None, error=f"the sandbox launcher failed ({why})", **common)
    if unkilled := _last(report, "unkilled"):
        common["error"] = f"{unkilled} of its processes survived {CLEANUP_S:g} s of kill attempts"
    if outcome == "timeout":
        return SandboxResult("timeout", None, None, "wall_time", **common)
    if outcome == "stopped" or (stopped and outcome.startswith("signal:")):
        return SandboxResult("killed", None, "SIGKILL", "output", **common)
    kind, _, number = outcome.partition(":")
    if kind == "signal":
        name = _signal_name(int(number))
        if name == "SIGXCPU":
            return SandboxResult("timeout", None, name, "cpu_time", **common)
        return SandboxResult("killed", None, name, "file_size" if name == "SIGXFSZ" else None, **common)
    code = int(number)
    if code == 0:
        return SandboxResult("passed", 0, None, None, **common)
    return SandboxResult("failed", code, None, _limit_from_traceback(common["stderr_tail"]), **common)


def _limit_from_traceback(stderr_tail: str) -> str | None:
    """The limit a Python program ran into, read off the last line of its traceback (the program wrote it)."""
    lines = stderr_tail.strip().splitlines()
    last = lines[-1] if lines else ""
    if last.startswith("MemoryError"):
        return "memory"
    if "[Errno 27]" in last:  # EFBIG, File too large: Python ignores SIGXFSZ, so writes fail instead
        return "file_size"
    if "[Errno 28]" in last:  # ENOSPC: the run's tmpfs is full
        return "disk"
    if "[Errno 24]" in last:  # EMFILE: RLIMIT_NOFILE
        return "open_files"
    return None


def _error_result(message: str) -> SandboxResult:
    return SandboxResult("error", None, None, None, "", "", 0, 0, 0.0, (), (), 0, message)


def _parse_status(data: bytes) -> dict[str, list[str]]:
    report: dict[str, list[str]] = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            report.setdefault(key, []).append(value)
    return report


def _last(report: dict[str, list[str]], key: str) -> str | None:
    values = report.get(key)
    return values[-1] if values else None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _exited(pid: int) -> bool:
    """Whether the child `pid` has exited, without reaping it (so its pid cannot be reused meanwhile)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nobody left in the group, or only processes of the sandbox uid that the launcher already killed


_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_inactive(result: SandboxResult) -> None:
    """Log each inactive protection once per process: recorded in every result, but said out loud once too."""
    with _warned_lock:
        for text in result.inactive:
            name = text.split(":", 1)[0]
            if text == MEMORY_CGROUP_OFF:
                continue  # an opt-in left off (the default): listed in every result, not worth a warning
            if name not in _warned:
                _warned.add(name)
                log.warning("sandbox protection not active: %s", text)
