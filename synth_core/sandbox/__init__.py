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

How it is built: a small launcher (`launcher._launcher`, a function compiled once by this process and sent to
`python -I -S -c` as a marshalled code object, so that it starts in ~10 ms without importing this package or
compiling its source: 3 ms a run) is started by a thread of ours. It forks
the program's process, which sets the limits, enters the namespaces, switches uid and execs the
interpreter; the launcher stays as the program's parent (as root where we are root, out of the program's
reach), ends it at the wall timeout or when asked (SIGTERM: output cap), kills and reaps what it leaves
behind, and reports on a status pipe. All of that is one fork-and-exec of a single-threaded process, so
the sandbox is safe to use from threads (no preexec_fn in a threaded parent).

One module per side of a run; each imports only modules above it in this list:
- result.py    what a run returns: SandboxResult, the status and protection names, verdict_limits (what stages
               import to judge and to fingerprint)
- host.py      our side before and after the program: the uid slot, the memory cgroup, the mount plan the
               launcher is given, the clean environment, removing what a run left
- launcher.py  the launcher process (plain standard library, sent as code, never imported by the program)
- runner.py    run_program / run_programs / probe_sandbox: starts the launcher, reads its pipes, turns its
               report into a SandboxResult
This package re-exports every public name the single module synth_core/sandbox.py had, so
`from synth_core.sandbox import X` keeps working.

What it leaves to others: deciding what to run and what a pass means (the score stage builds the program
text, e.g. a solution followed by its own asserts). What it does not stop: reading world-readable files of the
host; connecting to a UNIX socket file of the host that others may write (a read-only mount does not stop a
connect; those in /tmp are hidden by its private /tmp); using memory up to `memory_mb` of address space in
EACH of its `max_procs` processes, plus pipe buffers, when no memory cgroup bounds the run (RLIMIT_AS is per
process: the bound of the whole run is their product); burning CPU on every core until the wall timeout; and
anything a kernel exploit can do: this is a process sandbox, not a virtual machine. Without root, the mount
namespace and all it holds are missing (see above).
"""

from synth_core.sandbox.host import MAIN_FILE, MAX_SLOTS, MEMORY_CGROUP_OFF, SHARED_TMP_DIRS, SLOT_LOCK_DIR
from synth_core.sandbox.launcher import LAUNCHER_STUB
from synth_core.sandbox.result import (
    DETAIL_CHARS,
    PARENT_PROTECTIONS,
    PROTECTIONS,
    VERDICTS,
    SandboxResult,
    Status,
    verdict_limits,
)
from synth_core.sandbox.runner import (
    CLEANUP_S,
    DRAIN_S,
    GRACE_S,
    READ_CHUNK,
    STATUS_MAX_BYTES,
    probe_sandbox,
    run_program,
    run_programs,
)

__all__ = [
    "CLEANUP_S",
    "DETAIL_CHARS",
    "DRAIN_S",
    "GRACE_S",
    "LAUNCHER_STUB",
    "MAIN_FILE",
    "MAX_SLOTS",
    "MEMORY_CGROUP_OFF",
    "PARENT_PROTECTIONS",
    "PROTECTIONS",
    "READ_CHUNK",
    "SHARED_TMP_DIRS",
    "SLOT_LOCK_DIR",
    "STATUS_MAX_BYTES",
    "VERDICTS",
    "SandboxResult",
    "Status",
    "probe_sandbox",
    "run_program",
    "run_programs",
    "verdict_limits",
]
