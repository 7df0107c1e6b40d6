"""The `scoder` command as a user runs it (a subprocess): fast help, one-line errors, build, inspect."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

SCODER = [sys.executable, "-m", "flows.cli"]
ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None, timeout=300):
    # Without PREFECT_API_URL: the command starts its own temporary server, as for a newcomer.
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([*SCODER, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_help_is_fast_and_lists_commands():
    t = time.perf_counter()
    r = run("--help")
    assert r.returncode == 0 and "pool" in r.stdout and "inspect" in r.stdout
    assert time.perf_counter() - t < 10
    r = run("pool", "build", "--help")
    assert "--source" in r.stdout and "--benchmark" in r.stdout and "--out" in r.stdout


def test_invalid_config_key_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("pool:\n  snipets: {}\n")
    r = run("pool", "build", "--config", str(bad))
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {bad}: unknown key 'pool.snipets'"


def test_missing_source_and_dataset_are_one_line_errors(tmp_path):
    r = run("pool", "build", "--source", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: source not found: {tmp_path / 'nope'}"
    r = run("inspect", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "no dataset at" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_build_then_inspect(tmp_path, source_tree):
    out = tmp_path / "pool"
    r = run(
        "pool", "build", "--source", str(source_tree), "--out", str(out),
        "--set", f"storage.root={tmp_path / 'data'}", "--set", "execution.max_workers=2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith(str(out))
    assert "rows in" in r.stdout and "kept" in r.stdout
    assert (out / "_manifest.json").is_file()
    r = run("inspect", str(out))
    assert r.returncode == 0, r.stderr
    assert "fingerprint" in r.stdout and "funnel" in r.stdout and "kept" in r.stdout
