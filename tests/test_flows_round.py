"""A whole round (scoder run) on the tiny model against a real Prefect API: the release and its data card, and a
round killed with SIGKILL in the middle of a stage that, run again, finishes with exactly the rows of an
uninterrupted round without recomputing the shards that had finished."""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import tiny_round_config

from synth_core.config import parse_config
from synth_core.round_plan import dated_config
from synth_core.storage import kept_rows, read_dataset, read_manifest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _config(tmp_path: Path, name: str) -> Path:
    cfg = tiny_round_config(tmp_path, name)
    cfg["round"]["probe_snippets"] = 2  # the probe: the bootstrap and iteration 1 on 2 seeds nothing else used
    cfg["round"]["release_from"] = "best_probe"  # the probe picks the synthesizer of the release
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# Both rounds of the resume test are the round of one date (the nightly deployment's mode): a re-run of that date
# must resume it exactly like an undated one.
DATE = "2026-11-26"


def _scoder_run(config: Path, api_url: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--date", DATE],
        cwd=ROOT,
        env=os.environ | {"PREFECT_API_URL": api_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the kill takes its engine subprocesses too
    )


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` (API and UI, SQLite) for this module: the harness of the other flow tests
    serves no UI."""
    from conftest import free_port

    port = free_port()
    home = tmp_path_factory.mktemp("prefect-home")
    api = f"http://127.0.0.1:{port}/api"
    # The UI it serves calls the API at PREFECT_API_URL (else at the default port 4200).
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": api}
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{api}/health", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("prefect server start did not answer in 120 s") from None
            time.sleep(0.5)
    yield api
    server.terminate()
    server.wait(timeout=30)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out.strip().splitlines()[-1]


def _rows(uri: str) -> list[dict]:
    # The checkpoint column holds folder paths, which differ between the two runs' roots; fingerprints do not.
    return [{k: v for k, v in r.items() if k != "checkpoint"} for r in read_dataset(uri).to_pylist()]


def _stage_fingerprints(release: str) -> list[str]:
    return [read_manifest(s["uri"]).fingerprint for s in read_manifest(release).stats["stages"]]


@pytest.fixture(scope="module")
def tiny_round(tmp_path_factory, prefect_server) -> tuple[Path, str]:
    """One uninterrupted tiny round (its work folder and release), shared by the tests of this module."""
    tmp_path = tmp_path_factory.mktemp("round")
    return tmp_path, _finish(_scoder_run(_config(tmp_path, "a"), prefect_server))


def test_round_release_and_resume_after_sigkill(tiny_round, prefect_server):
    tmp_path, release = tiny_round
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
        "probe: sample",
        "synthesize: sample",
        "synthesize: score",
        "synthesize: dedup",
    ]  # the release is not influence-filtered by default (round.release_influence)
    # The tiny random model writes nothing usable: the release is empty (tests/test_release.py fills one).
    assert read_manifest(release).num_rows == 0 and "0 code-instruction pairs" in card
    # Every iteration sampled its own seeds: 2 snippets x 2 checkpoints x 2 samples, none shared with the release.
    samples = {s["stage"]: s["uri"] for s in read_manifest(release).stats["stages"]}
    it1 = read_dataset(samples["iteration 1: sample"]).column("snippet_id").to_pylist()
    syn = read_dataset(samples["synthesize: sample"]).column("snippet_id").to_pylist()
    assert len(it1) == len(syn) == 8 and not set(it1) & set(syn)
    # The probe: both synthesizers on the same 2 seeds, which no other stage used. Iteration 1 kept nothing, so it
    # trained on R alone and has the bootstrap's weights: sampled once (2 checkpoints x 2 samples x 2 seeds).
    probe_rows = read_dataset(samples["probe: sample"]).to_pylist()
    assert len(probe_rows) == 8 and not {r["snippet_id"] for r in probe_rows} & (set(it1) | set(syn))
    probe = read_manifest(release).stats["probe"]
    assert probe["seeds"] == 2 and [(r["synthesizer"], r["answers"]) for r in probe["records"]] == [
        ("bootstrap", 8),
        ("after iteration 1", 8),
    ]
    assert probe["records"][1]["same_weights_as"] == "bootstrap"
    assert probe["records"][1]["vs"] == {"against": "bootstrap", "gained": 0, "lost": 0, "tied": 2, "p": None}
    assert "## Probe" in card and "after iteration 1 (the same weights as the bootstrap)" in card
    # round.release_from best_probe: a tie (the same weights) goes to the later synthesizer, iteration 1.
    assert probe["release_from"] == "after iteration 1" and "The release was written by the after iteration 1" in card
    assert read_manifest(samples["synthesize: sample"]).config["sample"]["checkpoints"] == [
        r["checkpoint"] for r in read_dataset(samples["iteration 1: train"]).to_pylist()
    ]
    # The date's round: its seed-snippet window and sampling seed (synth_core.round_plan.dated_config).
    dated = dated_config(
        parse_config(yaml.safe_load(_config(tmp_path, "a").read_text())),
        datetime.date.fromisoformat(DATE),
        kept_rows(samples["pool"]),
    )
    sample_cfg = read_manifest(samples["iteration 1: sample"]).config["sample"]
    assert sample_cfg["generation"]["seed"] == dated.sample.generation.seed != 0
    assert sample_cfg["first_snippet"] == dated.round.first_snippet

    # The same round, killed once the first shard of iteration 1's sample stage has finished.
    config_b = _config(tmp_path, "b")
    proc = _scoder_run(config_b, prefect_server)
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

    resumed = _finish(_scoder_run(config_b, prefect_server))
    assert marker.stat().st_mtime_ns == before  # the finished shard was not recomputed
    assert killed_mid_stage  # (the kill landed inside the stage: its manifest was not written yet)
    assert _stage_fingerprints(resumed) == _stage_fingerprints(release)
    final_a, final_b = read_manifest(release).inputs[0], read_manifest(resumed).inputs[0]
    assert _rows(final_b) == _rows(final_a)
    assert _rows(resumed) == _rows(release)


@pytest.mark.slow
def test_the_prefect_ui_shows_the_stages_and_the_funnel(tiny_round, prefect_server):
    """The round as a user sees it: the flow run page in headless Chromium (driven by playwright) lists the stages
    as subflow runs and the round's funnel artifact; the screenshots stay in the test's temp folder."""
    # `make test` installs chromium (Makefile target `browser`) and playwright (the dev extra): a missing one is a
    # broken setup, so the test fails instead of skipping.
    assert CHROMIUM is not None, "Debian's chromium is missing: `make browser` (or apt-get install chromium)"
    import playwright.sync_api as playwright
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    tmp_path, release = tiny_round
    with temporary_settings({PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        run = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["round"])), sort=FlowRunSort.START_TIME_DESC, limit=1
        )[0]
    ui = prefect_server.removesuffix("/api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{ui}/runs/flow-run/{run.id}")
        page.screenshot(path=str(tmp_path / "round-page.png"))
        page.get_by_text("Subflow Runs", exact=True).first.click()
        # the round's own subflows (iteration 1's influence is a subflow of the iteration, not of the round)
        for stage in ("pool-build", "bootstrap", "iteration", "sample", "score"):
            page.get_by_text(stage, exact=False).first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "round-subflows.png"))
        page.get_by_text("Artifacts", exact=True).first.click()
        page.get_by_text("round-summary", exact=False).first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "round-artifacts.png"))
        browser.close()
    assert (tmp_path / "round-subflows.png").stat().st_size > 10_000
    assert (tmp_path / "round-artifacts.png").stat().st_size > 10_000
