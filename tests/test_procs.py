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
import os, sys, time
from synth_core.procs import run_in_subprocess
print(os.getpid(), flush=True)
run_in_subprocess(time.sleep, 120)
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
        deadline = time.monotonic() + 60
        children: list = []
        while not children and time.monotonic() < deadline:
            children = psutil.Process(parent.pid).children()
            time.sleep(0.1)
        assert children, "the child process did not start"
        time.sleep(1.0)  # let the child pass its prctl
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"orphaned child still running: {alive}"
    finally:
        parent.kill()
