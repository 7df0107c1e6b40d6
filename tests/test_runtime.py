"""How `scoder` runs on this machine, as a user runs it (real subprocesses): the output location is checked
before any work, two writers never share a location, and nothing the CLI starts outlives it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

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
