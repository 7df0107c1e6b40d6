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


def test_reference_build_against_an_endpoint(tmp_path):
    """`scoder reference build` against a real HTTP server in this process (tests/openai_stub.py, a stand-in for a
    proprietary endpoint): the funnel and the bill on stdout, the URI last; a re-run sends nothing."""
    from conftest import SNIPPETS, write_pool
    from openai_stub import GOOD_ANSWER, Reply, ScriptedEndpoint, completion

    pool = write_pool(str(tmp_path / "pool"), SNIPPETS)
    with ScriptedEndpoint(lambda call: Reply(body=completion(GOOD_ANSWER))) as ep:
        args = [
            "reference", "build", "--endpoint", ep.url, "--model", "stub", "--snippets", pool, "--max-snippets", "3",
            "--set", f"storage.root={tmp_path / 'data'}", "--set", "teacher.usd_per_1m_output=10",
        ]  # fmt: skip
        r = run(*args)
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(ep.calls) == 3
        assert "rows in" in r.stdout and "kept" in r.stdout and "cost_usd" in r.stdout
        uri = r.stdout.strip().splitlines()[-1]
        assert (Path(uri) / "_manifest.json").is_file() and "3/3" in r.stderr  # the progress bar
        again = run(*args)
        assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == uri and len(ep.calls) == 3


def test_reference_build_errors_are_one_line(tmp_path, source_tree):
    r = run("reference", "build", "--snippets", str(tmp_path / "nope"), "--model", "m")
    assert r.returncode == 2 and r.stderr.startswith("error: no dataset at") and len(r.stderr.splitlines()) == 1
    r = run("reference", "build", "--set", f"pool.sources=[{source_tree}]", "--set", f"storage.root={tmp_path}")
    assert r.returncode == 2 and "the config's pool is not built" in r.stderr and len(r.stderr.splitlines()) == 1
    r = run("reference", "build", "--snippets", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error: teacher.model is not set")
    # --api-key-env names a variable the user means to be set (issue 16): unset, it is an error naming it.
    r = run("reference", "build", "--model", "m", "--api-key-env", "SCODER_TEST_NEVER_SET_KEY")
    assert r.returncode == 2 and "SCODER_TEST_NEVER_SET_KEY is not set" in r.stderr and len(r.stderr.splitlines()) == 1
