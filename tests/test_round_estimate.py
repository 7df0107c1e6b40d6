"""The round planner (scoder run --plan) and the seed-shortfall checks: the shipped GPU config's plan, a pool that
cannot feed a round (the planner, the CLI, a real round flow and a real sample stage on a tiny pool)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SNIPPETS, tiny_round_config, write_pool

from synth_core import sample
from synth_core.config import ConfigError, RunConfig, load_config, parse_config
from synth_core.round_estimate import (
    PoolTooSmallError,
    check_pool_feeds,
    estimate_round,
    expected_top_k,
    plan_lines,
    plan_record,
    pool_size,
)
from synth_core.storage import read_manifest

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "configs" / "gpu-round.yaml"


def _scoder(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_gpu_round_plan_releases_the_papers_size_from_a_pool_that_feeds_it():
    cfg = load_config(GPU)
    assert cfg.pool.sources == ["hf:bigcode/python-stack-v1-functions-filtered"]
    plan = plan_record(estimate_round(cfg, 96))
    assert plan["release_rows"] >= 60_000  # the paper's student trained on 60K synthesized samples
    seeds = sum(s["seeds"] for s in plan["stages"])
    assert seeds == 3 * 20_000 + 64_000 <= plan["pool_snippets"]
    assert [s["stage"] for s in plan["stages"]] == ["iteration 1", "iteration 2", "iteration 3", "release"]
    it1 = plan["stages"][0]
    assert it1["candidates"] == 20_000 * 3 * 4  # seeds x checkpoints x samples per prompt
    assert list(it1["after"]) == ["sample checks", "score", "influence"]
    assert it1["after"]["influence"] == math.ceil(it1["after"]["score"] / 2)  # keep_fraction 0.5
    assert "influence" not in plan["stages"][-1]["after"]  # release_influence is off
    assert 0 < plan["device_hours"] < 1000


def test_cli_plan_prints_the_plan_and_fails_in_one_line_when_the_pool_cannot_feed_it():
    ok = _scoder("run", "--plan", "--config", str(GPU))
    assert ok.returncode == 0, ok.stderr
    assert "after score 63,928, after dedup 60,092" in ok.stdout
    assert "released dataset: 60,092 rows expected" in ok.stdout
    assert "[inferred]" in ok.stdout and "device-hours" in ok.stdout
    bad = _scoder("run", "--plan", "--config", str(GPU), "--set", "plan.pool_snippets=100000")
    assert bad.returncode == 2
    err = bad.stderr.strip().splitlines()
    assert len(err) == 1, bad.stderr
    assert err[0].startswith("error: synthesize: sample: the pool cannot feed it")
    assert "short by 24,000" in err[0]  # 60,000 + 64,000 asked, 100,000 there


def test_planner_counts_and_pool_size():
    # E[min(k, Binomial(n, p))] against its definition.
    assert expected_top_k(3, 0.5, 1) == pytest.approx(1 - 0.5**3)
    assert expected_top_k(3, 0.5, 2) == pytest.approx(1 - 0.5**3 + (1 - 0.5**3 - 3 * 0.5**3))
    assert expected_top_k(4, 0.25, None) == pytest.approx(1.0)
    cfg = RunConfig()
    assert pool_size(cfg) == (4839, "the stdlib pool's measured count (plan.stdlib_snippets)")
    cfg.pool.sources = ["some/folder"]
    with pytest.raises(ConfigError, match="plan.pool_snippets"):
        pool_size(cfg)
    cfg.plan.source_rows = 1000
    assert pool_size(cfg)[0] == 2700
    # accumulate_kept: iteration 2 trains on R + both iterations' kept rows.
    cfg = parse_config({"round": {"iterations": 2, "accumulate_kept": True}, "plan": {"pool_snippets": 100}})
    est = estimate_round(cfg, 48)
    r_train = 48 - math.floor(48 * 0.1)
    assert est.stages[1].train_rows == pytest.approx(r_train + est.stages[0].rows_out + est.stages[1].rows_out)


def test_pool_feeds_check_names_the_first_stage_that_runs_dry():
    cfg = parse_config({"round": {"iterations": 2, "snippets_per_iteration": 5, "synthesize_snippets": 10}})
    assert check_pool_feeds(cfg, 20) == []
    with pytest.raises(PoolTooSmallError, match=r"^iteration 2: sample: .* \(short by 2\);"):
        check_pool_feeds(cfg, 8)
    cfg.round.seed_shortfall = "warn"
    lines = check_pool_feeds(cfg, 8)
    assert [line.split(":")[0] for line in lines] == ["iteration 2", "synthesize"]


def test_the_probe_is_planned_and_fed_after_the_release():
    """The probe's window comes after the release's; the plan samples it from every synthesizer (base, bootstrap,
    each iteration: their checkpoints x samples) and filters and trains nothing."""
    cfg = parse_config(
        {"round": {"iterations": 2, "snippets_per_iteration": 5, "synthesize_snippets": 10, "probe_snippets": 4}}
    )
    assert check_pool_feeds(cfg, 24) == []
    with pytest.raises(PoolTooSmallError, match=r"^probe: sample: .* \(short by 1\);"):
        check_pool_feeds(cfg, 23)
    cfg.round.compare_base = True
    probe = plan_record(estimate_round(cfg, 48))["stages"][-1]
    assert probe["stage"] == "probe" and probe["seeds"] == 4
    assert probe["candidates"] == 4 * (3 * 2 + 1) * 2 and probe["train_rows"] == 0
    assert list(probe["hours"]) == ["sample"]
    lines = plan_lines(cfg, estimate_round(cfg, 48))
    want = "probe: seeds 4 (asked 4, from #20); candidates 56; device-hours: sample "
    assert any(line.startswith(want) for line in lines)
    released = plan_record(estimate_round(cfg, 48))["release_rows"]
    cfg.round.probe_snippets = 0
    assert plan_record(estimate_round(cfg, 48))["release_rows"] == released


def test_sample_stage_that_runs_out_of_seeds_says_so(tmp_path, cfg, tiny_model):
    """A real sample stage on a pool of 4 kept snippets asked for 6: an error by default; with 'warn', the samples
    of the 4 and a funnel line with the shortfall."""
    pool = write_pool(str(tmp_path / "pool"), SNIPPETS)
    cfg.sample.checkpoints = [tiny_model]
    cfg.sample.generation.backend = "transformers"
    cfg.sample.generation.max_new_tokens = 4
    cfg.sample.generation.samples_per_prompt = 1
    cfg.sample.execute = False
    cfg.sample.max_snippets = 6
    cfg.sample.first_snippet = 0
    cfg.sample.iteration = cfg.round.iterations + 1  # the release's sample stage
    with pytest.raises(sample.SeedShortfallError) as err:
        sample.plan_sample(cfg, pool)
    assert str(err.value).startswith("synthesize: sample: the pool ran out of seed snippets: asked for 6")
    assert "got 4 (short by 2)" in str(err.value) and "\n" not in str(err.value)
    cfg.round.seed_shortfall = "warn"
    out = sample.build_samples(cfg, pool, str(tmp_path / "samples"))
    funnel = read_manifest(out).funnel
    assert funnel["rows_in"] == 4
    assert funnel["seed_shortfall"] == {"requested": 6, "available": 4, "short": 2}
    from synth_core.report import funnel_rows

    assert ("seed snippets short (asked 6, got 4)", 2, "-") in funnel_rows(funnel)


@pytest.mark.usefixtures("prefect_api")
def test_round_whose_pool_runs_dry_fails_before_the_bootstrap(tmp_path):
    """A real round flow on a 4-file pool asked for 2 + 50 seeds: it fails right after the pool stage, naming the
    release's sample stage and the shortfall, before any training starts."""
    from flows.round import round_flow

    data = tiny_round_config(tmp_path, "dry")
    data["round"]["synthesize_snippets"] = 50
    state = round_flow(config=data, return_state=True)
    assert state.is_failed()
    with pytest.raises(PoolTooSmallError, match=r"^synthesize: sample: the pool cannot feed it: asks for 50 "):
        state.result()
    assert not (tmp_path / "dry" / "train").exists()  # no bootstrap ran
