"""A watchdog process that ends whatever a run started once the run's process is gone, however it went.

`scoder` starts a temporary Prefect server and worker processes. A SIGKILL (or an OOM kill) to the CLI runs no
cleanup at all, and those processes used to keep running, listening and computing, with their flow run RUNNING
in the server's database forever. So every run starts this small process (`Reaper`), in a session of its own so
that a terminal's Ctrl-C to the foreground group does not take it down first. It holds the read end of a pipe
whose write end only the run's process holds: end of file means the run's process ended (exit, signal, crash).

Then, unless the run said `done` (an orderly end that already cleaned up), the reaper
1. marks the run's flow runs that are still RUNNING/PENDING as CRASHED, through the Prefect API the run used
   (plain HTTP: importing Prefect here would cost seconds), while that API still listens;
2. ends every process carrying the run's token in its environment (the server, the workers, their children:
   they inherit it, even once re-parented to init), SIGTERM first, SIGKILL after a grace period.

It knows nothing of flows or stages; it imports only the standard library and psutil.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
import uuid
from typing import IO

TOKEN_ENV = "SCODER_RUN_TOKEN"
TAG_PREFIX = "scoder-run:"
SCODER_TAG = "scoder"
OWNER_PREFIX = "scoder-owner:"
# Seconds a process gets to exit after SIGTERM before SIGKILL: the Prefect server needs about one to close.
GRACE_S = 3.0
# Seconds for each Prefect API call of the cleanup: a dead server must not delay the kill.
API_TIMEOUT_S = 3.0


class Reaper:
    """The parent's side: start the watchdog, tell it the API URL, and say `done` after an orderly end."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex[:16]
        self._proc: subprocess.Popen[bytes] | None = None
        self._pipe: IO[bytes] | None = None
        self._old_token: str | None = None

    @property
    def tag(self) -> str:
        """The tag the run's flow runs carry, so that the reaper crashes these and no other run's."""
        return f"{TAG_PREFIX}{self.token}"

    @property
    def tags(self) -> list[str]:
        """Every tag the run's flow runs carry: scoder's, this run's, and its process (for `crash_orphaned`)."""
        return [SCODER_TAG, self.tag, f"{OWNER_PREFIX}{os.getpid()}@{socket.gethostname()}"]

    def start(self) -> Reaper:
        self._old_token = os.environ.get(TOKEN_ENV)
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}  # the reaper never reaps itself
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "flows.reaper", str(os.getpid()), self.token],
            stdin=subprocess.PIPE,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
        self._pipe = self._proc.stdin
        # Set after the reaper started, so everything the run starts from now on inherits it.
        os.environ[TOKEN_ENV] = self.token
        return self

    def tell_api(self, api_url: str) -> None:
        self._send(f"api {api_url}")

    def _send(self, line: str) -> None:
        if self._pipe is not None:
            try:
                self._pipe.write(f"{line}\n".encode())
                self._pipe.flush()
            except OSError:
                pass  # the reaper is gone; nothing to tell

    def stop(self, orderly: bool) -> None:
        """End the watch. `orderly`: the run cleaned up after itself; otherwise the reaper cleans up now
        (an interrupted run: its workers may still be busy) and this waits for it, a few seconds at most."""
        if orderly:
            self._send("done")
        if self._pipe is not None:
            try:
                self._pipe.close()
            except OSError:
                pass
            self._pipe = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=None if not orderly else 10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._old_token is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = self._old_token

    def __enter__(self) -> Reaper:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # A normal exception unwound through Prefect's engine and the task runner's shutdown: orderly.
        # KeyboardInterrupt/SystemExit may have left workers mid-shard.
        self.stop(orderly=exc_type is None or issubclass(exc_type, Exception))


def crash_flow_runs(api_url: str, tag: str, message: str) -> int:
    """Set the flow runs carrying `tag` that are still RUNNING or PENDING to CRASHED; how many were set."""
    body = {
        "flow_runs": {"tags": {"all_": [tag]}, "state": {"type": {"any_": ["RUNNING", "PENDING", "SCHEDULED"]}}},
        "limit": 200,
    }
    runs = _post(f"{api_url.rstrip('/')}/flow_runs/filter", body)
    done = 0
    for run in runs or []:
        state = {"type": "CRASHED", "name": "Crashed", "message": message}
        _post(f"{api_url.rstrip('/')}/flow_runs/{run['id']}/set_state", {"state": state, "force": True})
        done += 1
    return done


def crash_orphaned(api_url: str) -> int:
    """Set to CRASHED the RUNNING/PENDING flow runs of scoder processes of this host that no longer exist: the
    ones whose process and reaper were both killed (a whole-machine OOM kill, a persistent server). Run as a run
    starts; how many were set."""
    body = {
        "flow_runs": {"tags": {"all_": [SCODER_TAG]}, "state": {"type": {"any_": ["RUNNING", "PENDING"]}}},
        "limit": 200,
    }
    host = socket.gethostname()
    done = 0
    for run in _post(f"{api_url.rstrip('/')}/flow_runs/filter", body) or []:
        owners = [t[len(OWNER_PREFIX) :] for t in run.get("tags", []) if t.startswith(OWNER_PREFIX)]
        for owner in owners:
            pid, _, owner_host = owner.partition("@")
            if owner_host == host and pid.isdigit() and not _pid_alive(int(pid)):
                message = f"its scoder process (pid {pid}) is gone; marked by a later run"
                state = {"type": "CRASHED", "name": "Crashed", "message": message}
                _post(f"{api_url.rstrip('/')}/flow_runs/{run['id']}/set_state", {"state": state, "force": True})
                done += 1
    return done


def _pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _post(url: str, body: dict) -> object:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=API_TIMEOUT_S) as resp:
        return json.loads(resp.read() or b"null")


def processes_with_token(token: str, skip: set[int]) -> list:
    """Every process whose environment carries this run's token (one this user can read), but `skip`."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        if proc.pid in skip:
            continue
        try:
            if proc.environ().get(TOKEN_ENV) == token:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def end_processes(procs: list, grace_s: float = GRACE_S) -> None:
    """SIGTERM, then SIGKILL whatever is still there after `grace_s`."""
    import psutil

    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


def watch(parent_pid: int, token: str) -> None:
    """The reaper's main loop: read the parent's lines until end of file, then clean up unless told `done`."""
    api_url = None
    done = False
    for raw in sys.stdin.buffer:
        line = raw.decode(errors="replace").strip()
        if line.startswith("api "):
            api_url = line[4:]
        elif line == "done":
            done = True
    if done:
        return
    if api_url:
        try:
            crash_flow_runs(api_url, f"{TAG_PREFIX}{token}", f"the scoder process (pid {parent_pid}) ended abruptly")
        except Exception as err:  # a dead API must not stop the kill below
            print(f"scoder reaper: could not mark flow runs crashed at {api_url}: {err}", file=sys.stderr)
    # Twice: a worker may start a child between the scan and its own end.
    for _ in range(2):
        procs = processes_with_token(token, skip={os.getpid(), parent_pid})
        if not procs:
            break
        end_processes(procs)


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
