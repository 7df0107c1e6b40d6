"""What a sandboxed run returns: SandboxResult, the status and protection names, and the limits a verdict depends on.

Stages import this side (VERDICTS, verdict_limits) to fingerprint and judge; how a result is produced is
runner.py's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from synth_core.config import SandboxConfig, SandboxProtection

PROTECTIONS: tuple[str, ...] = get_args(SandboxProtection)
# Held by this side (the parent), whatever the OS permits.
PARENT_PROTECTIONS = ("clean_env", "tmp_cwd", "new_session", "wall_timeout", "output_cap")

Status = Literal["passed", "failed", "timeout", "killed", "error"]
VERDICTS = ("passed", "failed", "timeout", "killed")  # statuses that judge the program ("error" judges the sandbox)
DETAIL_CHARS = 1000  # tail of a failing program's stderr that stages keep in a row's exec_detail


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
