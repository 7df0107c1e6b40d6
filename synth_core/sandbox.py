"""Run untrusted generated Python in a sandbox and say how it ended and which protections held it.

`run_program(code, cfg)` runs one program, `run_programs(codes, cfg)` runs many with a bounded number at
once (threads, each waiting on one sandboxed process). A program runs as `python -I -B main.py ARGS` (the
interpreter of this process, in isolated mode: PYTHON* variables, the user site and the script folder are
ignored) with stdin empty (/dev/null), in a fresh working folder that is removed afterwards, with an
environment of a few fixed variables (PATH, HOME and TMPDIR = the working folder, LANG, one BLAS thread)
and nothing of this process's own, so no credential can be read from it.

How a run is held, each protection by the name a result lists it under (`SandboxResult.protections`):

- clean_env, tmp_cwd, new_session: the fixed environment, the fresh working folder, a new session (process
  group) so that the program is signalled apart from us.
- wall_timeout: the program's whole process tree is killed after `timeout_s` of wall time.
- output_cap: stdout and stderr are read through pipes as they come; only the last `tail_bytes` of each are
  kept, and a program that writes more than `max_output_bytes` in all is killed (a huge output never
  reaches our memory).
- rlimit_cpu, rlimit_as, rlimit_fsize: CPU time, address space and file size of each of its processes.
- sandbox_uid: when we are root, the program runs as an unprivileged uid of its own (`uid_base + slot`,
  one slot per run at once, held with a lock file so that other processes running sandboxes never share
  it). That uid cannot write outside its folder (the permissions stop it), cannot signal us or read our
  /proc entries, and lets us kill everything it started with one kill(-1) sent from that uid, even
  processes that left its process group.
- rlimit_nproc: processes + threads of that uid. Counted per uid, and root is exempt, so it is only active
  with sandbox_uid (a fork bomb then stops at `max_procs`).
- subreaper: a launcher process (below) stays the program's parent and adopts its orphans, so that every
  process it leaves behind is killed and reaped when it ends (`leftover_procs` counts them).
- netns, ipcns: new, empty network and System V IPC namespaces (no interface but a down loopback: no
  connection anywhere, not even to 127.0.0.1), when the OS permits them (root with CAP_SYS_ADMIN, or an
  unprivileged user namespace).
- mountns: a private mount namespace for the program (as root), in which:
  - readonly_root: every mount of the host is read-only (one recursive mount_setattr, Linux >= 5.12), so no
    world-writable place of the host (/run/lock, which /var/lock points to, or any other) keeps what the
    program writes, and a program running as root (uid_base null) cannot change the host's files either;
  - private_tmp, disk_limit: ONE fresh tmpfs of `max_file_mb` + 1 MiB holds all the program may write: its
    working folder (bound at the path it had; main.py is copied in: the program never writes the host disk),
    /tmp, /var/tmp and /dev/shm. Their sum is bounded, nothing on them outlives the run, no other run sees it.
    When the interpreter lives in one of those folders, or under a folder the sandbox uid may not enter
    (pyenv under a 0700 /root, as on our dev machines), its folders are bound back at the same paths (the
    latter on an empty 1 MiB tmpfs that replaces the closed folder);
  - proc_hidepid: a /proc of its own, mounted with hidepid=2: the program sees only its own uid's processes,
    never another process's command line or environment (the launcher's and ours included). As root
    (uid_base null) it would see everything, so it is only listed active with sandbox_uid.
- rlimit_nofile: `max_open_files` descriptors per process (a bound on pipes and other kernel memory).
- no_new_privs, seccomp: no setuid binary gives privileges back, and a seccomp filter makes the calls that
  generated code never needs fail with EPERM: ptrace and process_vm_readv/writev, mount and the other mount
  calls, unshare, setns and clone with a namespace flag, the kernel keyring (keyctl, add_key, request_key),
  bpf, perf_event_open; and, when no memory cgroup bounds the run, memfd_create, memfd_secret and shmget,
  whose memory RLIMIT_AS does not count (768 MiB in memfds got past a 256 MiB limit). The filter uses x86-64
  syscall numbers: on another architecture it is not loaded and `seccomp` is listed inactive (with why).
- memory_cgroup (opt-in, `sandbox.memory_cgroup`): the run's whole tree in a cgroup v2 of its own with
  memory.max = `memory_mb` and no swap, under a folder delegated to us; a run killed there says limit
  'memory'. Off by default: it needs a delegated cgroup v2 memory controller, which many hosts (ours: cgroup
  v1 memory) do not have.

Whatever the OS refuses is recorded, not hidden: `SandboxResult.inactive` says which protection was not
active and why, and `SandboxConfig.required` turns a missing one into status 'error' instead of a run.
Started without root, a program runs as our own uid: the limits, the namespaces (where user namespaces are
allowed) and the cleanup of its tree still hold, but it can signal our processes, read what we can read,
and fork until the wall timeout; use that mode for trusted code only.

How it is built: a small launcher (`_launcher`, a function of this module compiled once here and sent to
`python -I -S -c` as a marshalled code object, so that it starts in ~10 ms without importing this package or
compiling its source: 3 ms a run) is started by a thread here. It forks
the program's process, which sets the limits, enters the namespaces, switches uid and execs the
interpreter; the launcher stays as the program's parent (as root where we are root, out of the program's
reach), ends it at the wall timeout or when asked (SIGTERM: output cap), kills and reaps what it leaves
behind, and reports on a status pipe. All of that is one fork-and-exec of a single-threaded process, so
the sandbox is safe to use from threads (no preexec_fn in a threaded parent).

What it leaves to others: deciding what to run and what a pass means (the score stage builds the program
text, e.g. a solution followed by its own asserts). What it does not stop: reading world-readable files of the
host; connecting to a UNIX socket file of the host that others may write (a read-only mount does not stop a
connect; those in /tmp are hidden by its private /tmp); using memory up to `memory_mb` of address space in
EACH of its `max_procs` processes, plus pipe buffers, when no memory cgroup bounds the run (RLIMIT_AS is per
process: the bound of the whole run is their product); burning CPU on every core until the wall timeout; and
anything a kernel exploit can do: this is a process sandbox, not a virtual machine. Without root, the mount
namespace and all it holds are missing (see above).
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import inspect
import itertools
import logging
import marshal
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from synth_core.config import SandboxConfig, SandboxProtection

log = logging.getLogger(__name__)

PROTECTIONS: tuple[str, ...] = get_args(SandboxProtection)
# Held by this side (the parent), whatever the OS permits.
PARENT_PROTECTIONS = ("clean_env", "tmp_cwd", "new_session", "wall_timeout", "output_cap")

Status = Literal["passed", "failed", "timeout", "killed", "error"]
VERDICTS = ("passed", "failed", "timeout", "killed")  # statuses that judge the program ("error" judges the sandbox)
DETAIL_CHARS = 1000  # tail of a failing program's stderr that stages keep in a row's exec_detail

# Lock files of the uid slots. A fixed path, not tempfile.gettempdir(): two processes with different TMPDIRs
# must still see each other's locks, or they would run programs under the same uid and kill each other's.
SLOT_LOCK_DIR = Path("/tmp/scoder-sandbox-slots")
MAX_SLOTS = 1024
# World-writable folders replaced by a private tmpfs in the program's mount namespace.
SHARED_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
# Beyond timeout_s, how long the launcher gets to start, clean up and report before we kill it ourselves.
GRACE_S = 5.0
# How long the launcher keeps killing a program's leftovers before it reports them as unkilled.
CLEANUP_S = 2.0
# After the launcher exits, how long we still read pipes that a process it could not kill holds open.
DRAIN_S = 0.5
STATUS_MAX_BYTES = 65536
READ_CHUNK = 65536
MAIN_FILE = "main.py"
MEMORY_CGROUP_OFF = "memory_cgroup: off (sandbox.memory_cgroup is null)"


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended. Tails are the LAST bytes of each stream (decoded as UTF-8, errors replaced)."""

    status: Status  # passed: exit 0; failed: exit != 0; timeout: wall or CPU limit; killed: a signal or the
    # output cap; error: the sandbox could not run it (see `error`)
    exit_code: int | None  # the program's exit status when it exited, else None
    signal: str | None  # the signal that ended it ("SIGKILL", "SIGXCPU", ...), else None
    limit: str | None  # which limit ended it: wall_time, cpu_time, output, file_size, memory, disk, open_files
    # (the last three from its traceback, or memory from its cgroup's OOM kills)
    stdout_tail: str
    stderr_tail: str
    stdout_bytes: int  # all bytes it wrote to stdout (counted, not kept)
    stderr_bytes: int
    wall_s: float  # wall time of the program itself (fork to exit), seconds
    protections: tuple[str, ...]  # the protections that were active, in PROTECTIONS order
    inactive: tuple[str, ...]  # "name: why" for each protection that was not
    leftover_procs: int  # processes still alive when the program ended, killed by the sandbox
    error: str | None = None  # what went wrong on the sandbox's side (status 'error')

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def failure_tail(self) -> str:
        """What a stage keeps of a run that did not pass: the last DETAIL_CHARS of its error or stderr ("" if none)."""
        return "" if self.passed else (self.error or self.stderr_tail or "")[-DETAIL_CHARS:]


def verdict_limits(cfg: SandboxConfig) -> dict:
    """The settings a verdict depends on, for the fingerprints of the stages that run code (not `workers`: how many
    run at once changes no verdict)."""
    keys = {"timeout_s", "cpu_s", "memory_mb", "max_procs", "network", "max_file_mb", "max_open_files"}
    limits = cfg.model_dump(mode="json", include=keys)
    return {**limits, "memory_cgroup": cfg.memory_cgroup is not None}  # whether one bounds the run, not where


def run_program(code: str, cfg: SandboxConfig | None = None, args: Sequence[str] = ()) -> SandboxResult:
    """Run `code` as a Python program in the sandbox (argv[1:] = args); how it ended."""
    cfg = cfg or SandboxConfig()
    with _uid_slot(cfg) as uid, _memory_cgroup(cfg) as (cgroup, cgroup_off):
        workdir = Path(tempfile.mkdtemp(prefix="scoder-sbx-", dir=_tmp_root(cfg)))
        try:
            main = workdir / MAIN_FILE
            main.write_text(code, encoding="utf-8", errors="surrogatepass")
            if uid is not None:
                os.chown(workdir, uid, uid)
                os.chown(main, uid, uid)
            result = _execute(workdir, uid, cfg, list(args), cgroup, cgroup_off)
            if cgroup and result.signal == "SIGKILL" and result.limit is None and _oom_kills(cgroup):
                result = dataclasses.replace(result, limit="memory")
            if uid is not None and "private_tmp" not in result.protections:
                _sweep_shared_tmp(uid)  # what it left in /tmp & co. would otherwise outlive it
        finally:
            shutil.rmtree(workdir, onerror=_force_remove)
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
# The launcher: runs in its own process (`python -I -S -B -c SOURCE SPEC`), never in this one. It must only
# use the standard library and import everything it needs inside the function: its source is all it gets.


def _launcher() -> None:
    # Only modules that cost nothing to import: marshal, not json, and the C _signal, not signal (json and
    # signal pull in re and enum: 16 ms instead of 10 ms of start-up, on every program).
    import _signal as signal
    import ctypes
    import marshal
    import os
    import resource
    import sys
    import time

    spec = marshal.loads(bytes.fromhex(sys.argv[2]))  # argv[1] is this function's own code (LAUNCHER_STUB)
    fd = spec["status_fd"]
    os.set_inheritable(fd, False)  # the program never gets the status pipe

    def say(key, value):
        os.write(fd, f"{key}={str(value).replace(chr(10), ' ')}\n".encode(errors="replace"))

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

    def oserror(what):
        err = ctypes.get_errno()
        return OSError(err, f"{what}: {os.strerror(err)}")

    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    libc.syscall.restype = ctypes.c_long

    CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWNET = 0x20000, 0x08000000, 0x10000000, 0x40000000
    MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
    PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 36, 38, 22
    MOUNTNS_PROTECTIONS = ("readonly_root", "private_tmp", "disk_limit", "proc_hidepid")

    uid, gid = spec["uid"], spec["gid"]
    use_uid = uid is not None
    root = os.geteuid() == 0
    # The program's orphans are re-parented to us, not to pid 1: ours to kill and to reap when it ends.
    subreaper = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    if subreaper:
        say("active", "subreaper")
    else:
        say("inactive", f"subreaper: prctl: {os.strerror(ctypes.get_errno())}")
    # SIGCHLD (a child ended) and SIGTERM (the parent's stop request) are taken with sigtimedwait, never by
    # a handler, so no signal can interrupt the bookkeeping below.
    watched = {signal.SIGCHLD, signal.SIGTERM}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)

    def kill_uid():
        """Fork a helper that becomes the sandbox uid and kills every process of it (kill(-1)); its pid."""
        helper = os.fork()
        if helper == 0:
            try:
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
                os.kill(-1, signal.SIGKILL)  # every process we may signal, i.e. of this uid, except ourselves
            finally:
                os._exit(0)
        return helper

    def children():
        me = os.getpid()
        try:
            with open(f"/proc/{me}/task/{me}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:  # a kernel without CONFIG_PROC_CHILDREN: scan /proc
            found = []
            for name in os.listdir("/proc"):
                if name.isdigit():
                    try:
                        with open(f"/proc/{name}/stat") as f:
                            if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                                found.append(int(name))
                    except (OSError, ValueError, IndexError):
                        pass
            return found

    def bind(fd, target):
        """Mount the folder open as `fd` (O_PATH) on `target`, which is made first if missing."""
        os.makedirs(target, mode=0o755, exist_ok=True)
        if libc.mount(f"/proc/self/fd/{fd}".encode(), target.encode(), None, MS_BIND | MS_REC, None) != 0:
            raise oserror(f"bind {target}")
        os.close(fd)

    def read_only_root():
        """Every mount of the namespace read-only, at once (mount_setattr, Linux >= 5.12; the number is the same on
        every architecture): the world-writable folders of the host (/run/lock, ...) with everything else."""
        attr = (ctypes.c_uint64 * 4)(1 | 2 | 4, 0, 0, 0)  # set MOUNT_ATTR_RDONLY | NOSUID | NODEV
        nr, at_fdcwd, at_recursive = ctypes.c_long(442), -100, ctypes.c_uint(0x8000)  # SYS_mount_setattr
        if libc.syscall(nr, at_fdcwd, b"/", at_recursive, attr, ctypes.c_size_t(ctypes.sizeof(attr))) != 0:
            raise oserror("mount_setattr / read-only")

    def private_disk(disk):
        """One tmpfs of `size_mb` for all the program may write: its working folder (where main.py is copied),
        /tmp, /var/tmp and /dev/shm are folders of it, so their sum is bounded, and none is on the host's disk."""
        workdir = disk["workdir"]
        with open(os.path.join(workdir, disk["main"]), "rb") as f:
            code = f.read()  # before the tmpfs hides the host's copy
        keep_fds = [(k, os.open(k, os.O_PATH | os.O_DIRECTORY)) for _, _, keeps in disk["shared"] for k in keeps]
        opts = f"mode=755,size={disk['size_mb']}m".encode()
        if libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts) != 0:
            raise oserror(f"mount tmpfs on {workdir}")
        fds = {}
        for sub, mode in [("work", 0o700)] + [(sub, 0o1777) for _, sub, _ in disk["shared"]]:
            path = os.path.join(workdir, sub)
            os.mkdir(path)
            os.chmod(path, mode)  # mkdir's mode passes through the umask
            if sub == "work" and use_uid:
                os.chown(path, uid, gid)
            fds[sub] = os.open(path, os.O_PATH | os.O_DIRECTORY)
        main_path = os.path.join(workdir, "work", disk["main"])
        with open(main_path, "wb") as f:
            f.write(code)
        if use_uid:
            os.chown(main_path, uid, gid)
        for target, sub, _ in disk["shared"]:
            bind(fds[sub], target)
        for keep, kfd in keep_fds:  # the interpreter, when it lives in /tmp (a CI's virtualenv)
            bind(kfd, keep)
        return fds["work"]

    def seccomp_program(deny_memory):
        """A classic-BPF seccomp filter (x86-64): what generated code never needs fails with EPERM, the rest runs.

        Denied: ptrace and process_vm_readv/writev (other processes' memory), mount, umount2, pivot_root and the
        new mount API (the mounts above stay as they are), unshare, setns and clone with a namespace flag (no
        new namespaces: with a user namespace a program would be root in it), keyctl, add_key, request_key (the
        kernel keyring), bpf, perf_event_open; with `deny_memory` (no memory cgroup bounds the run) also
        memfd_create, memfd_secret and shmget, whose memory RLIMIT_AS does not count. clone3 gets ENOSYS, so
        that glibc falls back to clone, whose flags a filter can read (clone3 passes them in memory). Calls of
        the other ABIs of an x86-64 kernel (i386 through int 0x80, x32) are refused whole: the numbers differ.
        """

        def op(code, k, jt=0, jf=0):
            return code.to_bytes(2, "little") + bytes((jt, jf)) + (k & 0xFFFFFFFF).to_bytes(4, "little")

        LD_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|..|K, BPF_RET|K
        ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38  # SECCOMP_RET_ALLOW, _ERRNO | errno
        denied = [101, 310, 311, 165, 166, 155, 428, 429, 430, 431, 432, 433, 442, 272, 308, 250, 248, 249, 321, 298]
        if deny_memory:
            denied += [319, 447, 29]
        CLONE, CLONE3, X32_BIT = 56, 435, 0x40000000
        NS_FLAGS = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
        prog = [op(LD_ABS, 4), op(JEQ, 0xC000003E, jt=1), op(RET, EPERM)]  # seccomp_data.arch == AUDIT_ARCH_X86_64
        prog += [op(LD_ABS, 0), op(JGE, X32_BIT, jf=1), op(RET, EPERM)]  # seccomp_data.nr
        prog += [op(JEQ, CLONE3, jf=1), op(RET, ENOSYS)]
        for nr in denied:
            prog += [op(JEQ, nr, jf=1), op(RET, EPERM)]
        prog += [op(JEQ, CLONE, jt=1), op(RET, ALLOW), op(LD_ABS, 16), op(JSET, NS_FLAGS, jf=1), op(RET, EPERM)]
        prog += [op(RET, ALLOW)]  # low half of args[0], the flags (little-endian) ^
        return b"".join(prog)

    def overmount(target, mode, size_mb, keeps):
        """A fresh tmpfs on `target`, with each folder in `keeps` (under target) bound back at its own path."""
        fds = [os.open(k, os.O_PATH | os.O_DIRECTORY) for k in keeps]  # before the tmpfs hides them
        opts = f"mode={mode:o},size={size_mb}m".encode()
        if libc.mount(b"tmpfs", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts) != 0:
            raise oserror(f"mount tmpfs on {target}")
        for keep, kfd in zip(keeps, fds, strict=True):
            os.makedirs(keep, mode=0o755, exist_ok=True)
            if libc.mount(f"/proc/self/fd/{kfd}".encode(), keep.encode(), None, MS_BIND | MS_REC, None) != 0:
                raise oserror(f"bind {keep}")
            os.close(kfd)

    def child():
        """The program's process: limits, namespaces, uid, then exec the interpreter. Never returns."""
        step = "limits"
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            for sig in (signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_DFL)
            active, inactive = [], []

            def limit(name, res, soft, hard):
                _, cur_hard = resource.getrlimit(res)
                if cur_hard != resource.RLIM_INFINITY:
                    soft, hard = min(soft, cur_hard), min(hard, cur_hard)
                resource.setrlimit(res, (soft, hard))
                active.append(name)

            # CPU: SIGXCPU at the soft limit, SIGKILL one second later if the program catches SIGXCPU.
            limit("rlimit_cpu", resource.RLIMIT_CPU, spec["cpu_s"], spec["cpu_s"] + 1)
            limit("rlimit_as", resource.RLIMIT_AS, spec["memory_bytes"], spec["memory_bytes"])
            limit("rlimit_fsize", resource.RLIMIT_FSIZE, spec["fsize_bytes"], spec["fsize_bytes"])
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core files of killed programs

            step = "memory cgroup"
            if spec["cgroup"]:  # before the mount namespace, whose /sys is read-only
                with open(os.path.join(spec["cgroup"], "cgroup.procs"), "w") as f:
                    f.write("0\n")  # this process, and from here on all it starts
                active.append("memory_cgroup")
            else:
                inactive.append(spec["cgroup_off"])

            step = "namespaces"
            if root:
                if libc.unshare(CLONE_NEWIPC) == 0:
                    active.append("ipcns")
                else:
                    inactive.append(f"ipcns: unshare: {os.strerror(ctypes.get_errno())}")
                if not spec["netns"]:
                    inactive.append("netns: the config allows the network")
                elif libc.unshare(CLONE_NEWNET) == 0:
                    active.append("netns")
                else:
                    inactive.append(f"netns: unshare: {os.strerror(ctypes.get_errno())}")
                if libc.unshare(CLONE_NEWNS) != 0:
                    reason = os.strerror(ctypes.get_errno())
                    inactive += [f"mountns: unshare: {reason}"]
                    inactive += [f"{p}: no mount namespace ({reason})" for p in MOUNTNS_PROTECTIONS]
                else:
                    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
                        raise oserror("make / private")
                    active.append("mountns")
                    plan = spec["mounts"]
                    step = "read-only root"
                    try:
                        read_only_root()
                        active.append("readonly_root")
                    except OSError as err:
                        inactive.append(f"readonly_root: {err}")
                    step = "private disk"
                    work_fd = private_disk(plan["disk"])
                    active.append("private_tmp")
                    step = "interpreter mounts"
                    for target, keeps in plan["closed"]:
                        overmount(target, 0o755, 1, keeps)
                    step = "working folder"
                    bind(work_fd, spec["workdir"])  # last: over whatever the mounts above put at its path
                    active.append("disk_limit")
                    step = "proc"
                    # A /proc of our own in which only the sandbox uid's processes exist (the host's command lines,
                    # including this launcher's, are hidden); as root (uid_base null) hidepid hides nothing.
                    if libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, b"hidepid=2") != 0:
                        inactive.append(f"proc_hidepid: mount proc: {os.strerror(ctypes.get_errno())}")
                    elif use_uid:
                        active.append("proc_hidepid")
                    else:
                        inactive.append("proc_hidepid: the program runs as root, which hidepid does not hide from")
                    os.chdir(spec["workdir"])  # through the bind mount
            elif spec["netns"]:
                # Unprivileged: network and IPC namespaces inside a new user namespace that maps only ourselves.
                me_uid, me_gid = os.getuid(), os.getgid()  # read before: inside, unmapped ids read as 65534
                if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC) == 0:
                    step = "user namespace id maps"
                    for name, text in (
                        ("setgroups", "deny"),
                        ("uid_map", f"{me_uid} {me_uid} 1"),
                        ("gid_map", f"{me_gid} {me_gid} 1"),
                    ):
                        with open(f"/proc/self/{name}", "w") as f:
                            f.write(text)
                    active += ["netns", "ipcns"]
                else:
                    reason = os.strerror(ctypes.get_errno())
                    inactive += [f"netns: user namespace: {reason}", f"ipcns: user namespace: {reason}"]
            else:
                inactive += ["netns: the config allows the network", "ipcns: needs root or a user namespace"]
            if not root:
                inactive += [f"{p}: needs root" for p in ("mountns", *MOUNTNS_PROTECTIONS)]

            if use_uid:
                step = "uid switch"
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
                active.append("sandbox_uid")
                # Set after the switch: counted for this uid from here on (a fork bomb stops at max_procs).
                limit("rlimit_nproc", resource.RLIMIT_NPROC, spec["nproc"], spec["nproc"])
                for path in spec["must_reach"]:
                    if not os.access(path, os.R_OK | os.X_OK):
                        raise PermissionError(
                            f"the sandbox uid {uid} cannot reach {path} (the interpreter); make it readable, "
                            "or allow a mount namespace, or set sandbox.uid_base to null (run as root)"
                        )
            else:
                why = "disabled (sandbox.uid_base is null)" if root else "not started as root"
                inactive += [
                    f"sandbox_uid: {why}",
                    "rlimit_nproc: counts per uid and root is exempt"
                    if root
                    else "rlimit_nproc: would count the caller's own processes",
                ]

            step = "open files limit"
            limit("rlimit_nofile", resource.RLIMIT_NOFILE, spec["nofile"], spec["nofile"])
            step = "seccomp"
            # no_new_privs: no setuid binary gives privileges back; it also lets a non-root process load a filter.
            if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
                active.append("no_new_privs")
            else:
                inactive.append(f"no_new_privs: prctl: {os.strerror(ctypes.get_errno())}")
            machine = os.uname().machine
            if machine != "x86_64":
                inactive.append(f"seccomp: the filter is written for x86-64 syscall numbers, this is {machine}")
            elif "no_new_privs" not in active:
                inactive.append("seccomp: needs no_new_privs")
            else:
                program = seccomp_program(deny_memory=not spec["cgroup"])
                buf = ctypes.create_string_buffer(program, len(program))
                # struct sock_fprog {unsigned short len; (6 bytes of padding) struct sock_filter *filter;}
                fprog = ctypes.create_string_buffer(
                    (len(program) // 8).to_bytes(2, "little") + bytes(6) + ctypes.addressof(buf).to_bytes(8, "little")
                )
                if libc.prctl(PR_SET_SECCOMP, 2, ctypes.addressof(fprog), 0, 0) == 0:  # SECCOMP_MODE_FILTER
                    active.append("seccomp")
                else:
                    inactive.append(f"seccomp: prctl: {os.strerror(ctypes.get_errno())}")

            missing = [p for p in spec["required"] if p not in active and not (p == "subreaper" and subreaper)]
            if missing:
                say("setup_error", f"required protections not active: {', '.join(missing)} ({'; '.join(inactive)})")
                os._exit(126)
            say("active", ",".join(active))
            for text in inactive:
                say("inactive", text)
        except BaseException as err:
            say("setup_error", f"{step}: {type(err).__name__}: {err}")
            os._exit(126)
        try:
            os.execv(spec["argv"][0], spec["argv"])
        except BaseException as err:
            say("setup_error", f"exec {spec['argv'][0]}: {type(err).__name__}: {err}")
        os._exit(127)

    if use_uid:
        # A slot is held by one run at a time, but a crashed earlier holder may have left processes of this uid.
        os.waitpid(kill_uid(), 0)
    started = time.monotonic()
    main = os.fork()
    if main == 0:
        child()
    deadline = started + spec["timeout_s"]
    outcome = None
    while outcome is None:
        while True:  # reap what ended: the program, or an orphan it left to us
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid == 0:
                break
            if pid == main:
                code = os.waitstatus_to_exitcode(status)
                outcome = f"exit:{code}" if code >= 0 else f"signal:{-code}"
                break
        if outcome is not None:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            outcome = "timeout"
            break
        info = signal.sigtimedwait(watched, left)
        if info is not None and info.si_signo == signal.SIGTERM:
            outcome = "stopped"
    say("wall_s", f"{time.monotonic() - started:.6f}")

    main_alive = outcome in ("timeout", "stopped")
    leftover, helper = 0, None
    cleanup_started = time.monotonic()
    while True:
        # The kill helper is ours, not the program's: never counted, never killed, one at a time (a new one
        # forked on every round kept the list non-empty for 2 s on a busy machine).
        remaining = [pid for pid in children() if pid != helper]
        if not remaining and subreaper:
            break  # nothing left: every process of the program descends from us
        if main_alive:
            try:
                os.kill(main, signal.SIGKILL)  # not reaped yet, so the pid is still ours
            except ProcessLookupError:
                pass
        if use_uid and helper is None:
            helper = kill_uid()
        for pid in remaining:
            try:
                os.kill(pid, signal.SIGKILL)  # our unreaped children: the pids cannot have been reused
            except ProcessLookupError:
                pass
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == main:
                main_alive = False
            elif pid == helper:
                helper = None
            else:
                leftover += 1
        if not subreaper:
            break  # orphans went to pid 1: one round on what we can see (and the uid's kill(-1)) is all we can do
        if time.monotonic() - cleanup_started > spec["cleanup_s"]:
            say("unkilled", len([pid for pid in children() if pid != helper]))
            break
        signal.sigtimedwait({signal.SIGCHLD}, 0.005)
    if helper is not None:
        os.waitpid(helper, 0)  # it has only a kill(-1) to do
    say("leftover", leftover)
    say("cleanup_s", f"{time.monotonic() - cleanup_started:.6f}")
    say("outcome", outcome)


@functools.cache
def _launcher_source() -> str:
    return inspect.getsource(_launcher) + "\n_launcher()\n"


# What `python -c` runs: the launcher's code object, compiled once by this process (the same interpreter runs
# it, so marshal's format matches). Compiling the ~20 kB source in every launcher cost 3 ms a run.
LAUNCHER_STUB = "import marshal, sys; exec(marshal.loads(bytes.fromhex(sys.argv[1])))"


@functools.cache
def _launcher_code() -> str:
    """The launcher's code object, marshalled, as hex (an argument of at most 128 KiB: MAX_ARG_STRLEN)."""
    # optimize=2 drops its docstrings (the launcher has no asserts): 5% less to send.
    code = marshal.dumps(compile(_launcher_source(), "<scoder-sandbox-launcher>", "exec", optimize=2)).hex()
    if len(code) >= 128 * 1024:
        raise RuntimeError("the sandbox launcher outgrew one argument: send it through a pipe instead")
    return code


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
    env = _clean_env(workdir)
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
        "mounts": _mount_plan(str(workdir), cfg, expose_interpreter=uid is not None) if os.geteuid() == 0 else {},
        "nofile": cfg.max_open_files,
        "cgroup": cgroup,
        "cgroup_off": cgroup_off,
        "must_reach": _interpreter_paths(),
        "workdir": str(workdir),
        "required": [p for p in cfg.required if p not in PARENT_PROTECTIONS],
        "cleanup_s": CLEANUP_S,
        "argv": [sys.executable, "-I", "-B", MAIN_FILE, *args],
    }
    # -S: the launcher needs no site-packages, which saves ~15 ms a run; the program gets them (no -S).
    argv = [sys.executable, "-I", "-S", "-B", "-c", LAUNCHER_STUB, _launcher_code(), marshal.dumps(spec).hex()]
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
        _kill_uid_processes(uid)  # the launcher died or gave up: kill what it could not
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


def _kill_uid_processes(uid: int) -> None:
    """Kill every process of `uid` from a short-lived process that becomes it (kill(-1) spares only itself)."""
    code = (
        "import os, signal\n"
        f"os.setgroups([]); os.setresgid({uid}, {uid}, {uid}); os.setresuid({uid}, {uid}, {uid})\n"
        "try:\n    os.kill(-1, signal.SIGKILL)\nexcept ProcessLookupError:\n    pass\n"
    )
    # Started as root (it must reach the interpreter), it switches uid itself before killing.
    subprocess.run([sys.executable, "-I", "-S", "-c", code], env={}, check=False, timeout=30)


def _clean_env(workdir: Path) -> dict[str, str]:
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


def _tmp_root(cfg: SandboxConfig) -> str:
    if cfg.tmp_root is None:
        return tempfile.gettempdir()
    os.makedirs(cfg.tmp_root, exist_ok=True)
    return cfg.tmp_root


@functools.cache
def _interpreter_paths() -> list[str]:
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
    paths = {os.path.dirname(os.path.abspath(sys.executable)), os.path.abspath(sys.prefix), *_interpreter_paths()}
    return sorted(p for p in paths if os.path.isdir(p))


@functools.cache
def _interpreter_mounts() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(closed folder, interpreter folders under it) for each folder others may not enter above the interpreter.

    Such a folder (pyenv under a 0700 /root) is replaced by an empty tmpfs in the program's mount namespace,
    with only the interpreter's folders bound back, so the sandbox uid reaches the interpreter and nothing else.
    """
    closed: dict[str, set[str]] = {}
    for path in _interpreter_paths() + [os.path.realpath(sys.base_prefix)]:
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


def _mount_plan(workdir: str, cfg: SandboxConfig, expose_interpreter: bool) -> dict:
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
def _memory_cgroup(cfg: SandboxConfig) -> Iterator[tuple[str | None, str]]:
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


def _oom_kills(cgroup: str) -> int:
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
def _uid_slot(cfg: SandboxConfig) -> Iterator[int | None]:
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


def _sweep_shared_tmp(uid: int) -> None:
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
                    shutil.rmtree(entry.path, onerror=_force_remove)
                else:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass


def _force_remove(func: Callable[[str], object], path: str, exc_info: tuple) -> None:
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
