"""The launcher: the process that forks the program, sets its limits, namespaces, mounts, uid and seccomp filter,
execs the interpreter, and reports how it ended on a status pipe.

What it leaves to others: everything on our side of the process boundary (runner.py starts it and turns its
report into a SandboxResult; host.py prepares the uid, cgroup and mount plan it is given).
"""

from __future__ import annotations

import functools
import inspect
import marshal

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
def launcher_code() -> str:
    """The launcher's code object, marshalled, as hex (an argument of at most 128 KiB: MAX_ARG_STRLEN)."""
    # optimize=2 drops its docstrings (the launcher has no asserts): 5% less to send.
    code = marshal.dumps(compile(_launcher_source(), "<scoder-sandbox-launcher>", "exec", optimize=2)).hex()
    if len(code) >= 128 * 1024:
        raise RuntimeError("the sandbox launcher outgrew one argument: send it through a pipe instead")
    return code
