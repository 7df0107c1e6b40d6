"""How `scoder` runs on this machine, as a user runs it (real subprocesses): the output location is checked
before any work, two writers never share a location, and nothing the CLI starts outlives it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

SCODER = [sys.executable, "-m", "flows.cli"]
ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    # Without PREFECT_API_URL: the command starts its own temporary server, as for a newcomer.
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PYTHONPATH"] = str(ROOT)
    return env


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*SCODER, *args], capture_output=True, text=True, env=_env(), timeout=timeout)


def test_unwritable_out_fails_before_any_work(tmp_path, source_tree):
    """--out naming an existing file: one error line, exit 2, in seconds (no server started, nothing ingested)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    t = time.monotonic()
    r = run("pool", "build", "--source", str(source_tree), "--out", str(afile), "--set", f"storage.root={tmp_path}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip() == f"error: cannot write to {afile}: it is an existing file, not a folder"
    assert time.monotonic() - t < 30
    assert not (tmp_path / "ingest").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "src"]


def _start_build(tmp_path: Path, source: Path, out: Path) -> subprocess.Popen:
    env = _env()
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # its own server database, read below
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"  # a loaded 2-core machine starts it slowly
    cmd = [
        *SCODER, "pool", "build", "--source", str(source), "--out", str(out),
        "--set", f"storage.root={tmp_path / 'root'}", "--set", "execution.task_runner=processes",
        "--set", "execution.max_workers=2",
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_workers(proc: subprocess.Popen, timeout_s: float = 240) -> dict:
    """Descendants of the CLI (pid -> psutil.Process) once a task-runner worker runs: the flow run is RUNNING."""
    import psutil

    cli = psutil.Process(proc.pid)
    seen: dict = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        for child in cli.children(recursive=True):
            try:
                seen[child.pid] = (child, " ".join(child.cmdline()))
            except psutil.Error:
                pass
        if any("spawn_main" in cmd for _, cmd in seen.values()) and any("uvicorn" in c for _, c in seen.values()):
            return seen
        time.sleep(0.2)
    raise AssertionError(f"no worker after {timeout_s} s: {[c for _, c in seen.values()]}")


def _survivors(seen: dict, within_s: float) -> list[str]:
    import psutil

    deadline = time.monotonic() + within_s
    while True:
        alive = []
        for p, cmd in seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(cmd[:120])
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.25)


def _flow_run_states(tmp_path: Path) -> list[str]:
    import sqlite3

    with sqlite3.connect(tmp_path / "prefect-home" / "prefect.db") as db:
        return [row[0] for row in db.execute("select state_type from flow_run")]


@pytest.mark.parametrize("signame", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_nothing_outlives_a_killed_cli(tmp_path, signame):
    """A signal to the CLI's pid alone (not its group) mid-flow: within seconds no process it started survives
    (the temporary Prefect server, the task runner's workers, the reaper), and the flow run ends CRASHED in the
    server's database instead of RUNNING forever. Before: the server and a worker still ran 10 s after a kill -9.
    """
    src = Path(sysconfig.get_paths()["stdlib"]) / "email"  # a real package: ingest takes seconds, not minutes
    out = tmp_path / "pool"
    proc = _start_build(tmp_path, src, out)
    try:
        seen = _wait_for_workers(proc)
        if signame == "SIGKILL":
            # Meanwhile a second build into the same --out refuses at once, naming the live one.
            r = run("pool", "build", "--source", str(src), "--out", str(out), "--set", f"storage.root={tmp_path}")
            assert r.returncode == 2, r.stderr[-2000:]
            assert "being written by another run" in r.stderr and f"pid {proc.pid}" in r.stderr
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        t = time.monotonic()
        os.kill(proc.pid, getattr(signal, signame))
        proc.wait(timeout=30)
        exited_s = time.monotonic() - t
        alive = _survivors(seen, within_s=15)
        assert not alive, f"still running {time.monotonic() - t:.1f} s after {signame}: {alive}"
        assert exited_s < 15, exited_s
    finally:
        proc.kill()
        proc.wait()
        for p, _ in locals().get("seen", {}).values():
            with contextlib.suppress(Exception):
                p.kill()
    states = _flow_run_states(tmp_path)
    assert states and "RUNNING" not in states and "PENDING" not in states, states
    assert set(states) <= {"CRASHED", "CANCELLED", "FAILED"}, states


def test_a_later_run_crashes_flow_runs_of_dead_processes(prefect_api):
    """A flow run left RUNNING by a process that died with its reaper (nothing could mark it) is marked CRASHED
    when the next run starts against the same server; a live process's run is left alone."""
    import socket

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Running

    from flows.reaper import OWNER_PREFIX, SCODER_TAG, crash_orphaned

    @flow(name="orphan-test")
    def noop() -> None:
        pass

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    with get_client(sync_client=True) as client:
        runs = {}
        for who, pid in (("dead", dead.pid), ("live", os.getpid())):
            run = client.create_flow_run(noop, tags=[SCODER_TAG, f"{OWNER_PREFIX}{pid}@{host}"])
            client.set_flow_run_state(run.id, Running(), force=True)
            runs[who] = run.id
        assert crash_orphaned(PREFECT_API_URL.value()) >= 1
        assert client.read_flow_run(runs["dead"]).state.type.value == "CRASHED"
        assert client.read_flow_run(runs["live"]).state.type.value == "RUNNING"


def test_commands_without_a_flow_check_out_first(tmp_path):
    """reference build and train write without a flow: they too refuse an unwritable --out in one line before
    any request or model load."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    for args in (
        ("reference", "build", "--snippets", str(tmp_path / "pool"), "--endpoint", "http://127.0.0.1:9/v1"),
        ("train",),
    ):
        r = run(*args, "--out", str(afile), "--set", f"storage.root={tmp_path}")
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert r.stderr.strip() == f"error: cannot write to {afile}: it is an existing file, not a folder", args
