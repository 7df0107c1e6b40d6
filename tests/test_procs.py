"""synth_core.procs: results and exceptions come back from the spawned child, and a child never outlives its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from synth_core.procs import SubprocessError, run_in_subprocess

PARENT = """
import os
from synth_core.procs import run_in_subprocess
print(os.getpid(), flush=True)
run_in_subprocess(exec, "import os, time; print(os.getpid(), flush=True); time.sleep(120)")
"""


def test_result_and_exceptions_come_back():
    assert run_in_subprocess(divmod, 7, 2) == (3, 1)
    with pytest.raises(ZeroDivisionError, match="division"):
        run_in_subprocess(divmod, 1, 0)
    with pytest.raises(SubprocessError, match="exit code"):
        run_in_subprocess(os._exit, 3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_child_dies_with_its_parent():
    """A parent SIGKILLed while its child works (a killed flow mid-stage) takes the child with it."""
    import psutil

    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        assert int(parent.stdout.readline()) == parent.pid
        child = psutil.Process(int(parent.stdout.readline()))  # printed by the child itself: it runs
        family = psutil.Process(parent.pid).children(recursive=True)  # the child, and the forkserver if any
        assert child in family
        time.sleep(1.0)  # let the child pass its prctl
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        gone, alive = psutil.wait_procs([child], timeout=10)
        assert not alive, f"orphaned child still running: {alive}"
    finally:
        parent.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the forkserver is the default on Linux only")
def test_forkserver_children_start_with_the_heavy_imports_done_and_the_callers_environment(tmp_path, monkeypatch):
    """The child is a fork of a server that imported torch (and the rest of PRELOAD) once; the caller's current
    environment and directory reach it all the same, also when set after the server started."""
    run_in_subprocess(divmod, 1, 1)  # the server runs from here on
    monkeypatch.setenv("SCODER_PROCS_PROBE", "set after the server started")
    monkeypatch.chdir(tmp_path)
    probe = "__import__('sys').modules.get('torch') is not None, __import__('os').environ.get('SCODER_PROBE_X')"
    monkeypatch.setenv("SCODER_PROBE_X", "42")
    assert run_in_subprocess(eval, probe) == (True, "42")
    assert run_in_subprocess(os.getcwd) == str(tmp_path)
    late = run_in_subprocess(eval, "__import__('os').environ.get('SCODER_PROCS_PROBE')")
    assert late == "set after the server started"
    monkeypatch.delenv("SCODER_PROBE_X")
    assert run_in_subprocess(eval, "__import__('os').environ.get('SCODER_PROBE_X')") is None


def test_spawn_on_request_and_a_bad_start_method_named(monkeypatch):
    monkeypatch.setenv("SCODER_SUBPROCESS_START", "spawn")
    assert run_in_subprocess(eval, "__import__('sys').modules.get('torch') is None")  # a fresh interpreter
    monkeypatch.setenv("SCODER_SUBPROCESS_START", "fork")
    with pytest.raises(ValueError, match="SCODER_SUBPROCESS_START='fork'"):
        run_in_subprocess(divmod, 1, 1)
