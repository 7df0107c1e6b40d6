"""A whole round (scoder run) on the tiny model against a real Prefect API: the release and its data card, and a
round killed with SIGKILL in the middle of a stage that, run again, finishes with exactly the rows of an
uninterrupted round without recomputing the shards that had finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import SNIPPETS

from synth_core.storage import read_dataset, read_manifest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("prefect_api")


def _config(tmp_path: Path, name: str) -> Path:
    src = tmp_path / "src"
    if not src.exists():  # written once: the pool's fingerprint covers its files' modification times
        src.mkdir()
        for i, s in enumerate(SNIPPETS):
            (src / f"m{i}.py").write_text(s.replace("return data", "data = 1") + "\n")
    cfg = {
        "storage": {"root": str(tmp_path / name)},
        "pool": {"sources": [str(src)]},
        "models": {"synthesizer": "builtin:tiny-random-llama"},
        "sample": {"shard_rows": 1, "generation": {"backend": "transformers", "max_new_tokens": 8}},
        "score": {"judge": "builtin:tiny-random-llama", "engine": {"backend": "transformers"}},
        "train": {"epochs": 1, "num_checkpoints": 2},
        "influence": {"proj_dim": 64},
        "execution": {"task_runner": "threads"},
        "round": {"iterations": 1, "snippets_per_iteration": 2, "synthesize_snippets": 2},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _scoder_run(config: Path) -> subprocess.Popen:
    from prefect.settings import PREFECT_API_URL

    env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the kill takes its engine subprocesses too
    )


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out.strip().splitlines()[-1]


def _rows(uri: str) -> list[dict]:
    # The checkpoint column holds folder paths, which differ between the two runs' roots; fingerprints do not.
    return [{k: v for k, v in r.items() if k != "checkpoint"} for r in read_dataset(uri).to_pylist()]


def _stage_fingerprints(release: str) -> list[str]:
    return [read_manifest(s["uri"]).fingerprint for s in read_manifest(release).stats["stages"]]


def test_round_release_and_resume_after_sigkill(tmp_path):
    # An uninterrupted round.
    release = _finish(_scoder_run(_config(tmp_path, "a")))
    card = (Path(release) / "README.md").read_text()
    assert card.startswith("---\nlicense:") and "## Funnel" in card and "iteration 1: influence" in card
    stages = [s["stage"] for s in read_manifest(release).stats["stages"]]
    assert stages == [
        "pool",
        "bootstrap",
        "iteration 1: sample",
        "iteration 1: score",
        "iteration 1: influence",
        "iteration 1: train",
        "synthesize: sample",
        "synthesize: score",
        "synthesize: influence",
    ]
    # The tiny random model writes nothing usable: the release is empty (tests/test_release.py fills one).
    assert read_manifest(release).num_rows == 0 and "0 code-instruction pairs" in card
    # Every iteration sampled its own seeds: 2 snippets x 2 checkpoints x 2 samples, none shared with the release.
    samples = {s["stage"]: s["uri"] for s in read_manifest(release).stats["stages"]}
    it1 = read_dataset(samples["iteration 1: sample"]).column("snippet_id").to_pylist()
    syn = read_dataset(samples["synthesize: sample"]).column("snippet_id").to_pylist()
    assert len(it1) == len(syn) == 8 and not set(it1) & set(syn)

    # The same round, killed once the first shard of iteration 1's sample stage has finished.
    config_b = _config(tmp_path, "b")
    proc = _scoder_run(config_b)
    deadline = time.monotonic() + 300
    marker = None
    while marker is None and time.monotonic() < deadline and proc.poll() is None:
        found = sorted((tmp_path / "b" / "samples").glob("*/_parts/00000.json"))
        marker = found[0] if found else None
        time.sleep(0.1)
    assert marker is not None, "the sample stage never finished a shard"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_mid_stage = not (marker.parent.parent / "_manifest.json").exists()
    before = marker.stat().st_mtime_ns

    resumed = _finish(_scoder_run(config_b))
    assert marker.stat().st_mtime_ns == before  # the finished shard was not recomputed
    assert killed_mid_stage  # (the kill landed inside the stage: its manifest was not written yet)
    assert _stage_fingerprints(resumed) == _stage_fingerprints(release)
    final_a, final_b = read_manifest(release).inputs[0], read_manifest(resumed).inputs[0]
    assert _rows(final_b) == _rows(final_a)
    assert _rows(resumed) == _rows(release)
