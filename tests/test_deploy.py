"""deployments/prefect.yaml and `scoder deploy` against a real Prefect server, with a real process worker.

The shipped project file is checked as it is (and as `prefect deploy` would read it). Registration uses its
`pool-refresh` deployment (flows/pool.py:pool_flow), which exists today; the nightly round's entrypoint
(flows/round.py) is registered the same way once it exists. A run triggered through the API is picked up by
`prefect worker start --run-once` in a subprocess and must complete.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from typer.testing import CliRunner

from flows.cli import app
from flows.deploy import DeployError, deploy_project, load_project

pytestmark = pytest.mark.usefixtures("prefect_api")

REPO = Path(__file__).resolve().parent.parent
PROJECT = REPO / "deployments" / "prefect.yaml"


def test_project_file_declares_the_nightly_round_and_both_pools():
    from prefect.cli.deploy._models import PrefectYamlModel  # what `prefect deploy` validates the file with

    PrefectYamlModel.model_validate(yaml.safe_load(PROJECT.read_text()))
    project = load_project(PROJECT)
    by_name = {d.name: d for d in project.deployments}
    round_ = by_name["nightly-round"]
    assert round_.entrypoint == "flows/round.py:round_flow"
    assert round_.work_pool == "scoder-gpu" and round_.concurrency_limit == 1
    assert [(s.cron, s.timezone, s.active) for s in round_.schedules] == [("0 2 * * *", "Europe/Berlin", True)]
    assert round_.parameters == {"config": None, "out": None, "run_date": "scheduled"}
    assert by_name["pool-refresh"].entrypoint == "flows/pool.py:pool_flow"
    assert by_name["pool-refresh"].work_pool == "scoder-cpu"
    assert {p.name: p.type for p in project.pools} == {"scoder-cpu": "process", "scoder-gpu": "process"}
    assert project.source == "/opt/scoder"


def test_bad_project_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "prefect.yaml"
    bad.write_text("deployments:\n  - name: x\n    entrypoint: flows/pool.py:pool_flow\n")
    with pytest.raises(DeployError, match="deployment 'x': work_pool: 'name' is required"):
        load_project(bad)
    bad.write_text(
        "deployments:\n  - name: x\n    entrypoint: a.py:f\n    work_pool: {name: p}\n"
        "    schedules: [{interval: 60}]\n"
    )
    with pytest.raises(DeployError, match="a schedule is a mapping of cron"):
        load_project(bad)
    with pytest.raises(DeployError, match="no deployment named nope"):
        deploy_project(PROJECT, names=["nope"], source=str(REPO))


def _deployment(full_name: str):
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(full_name)


def test_deploy_registers_the_schedule_and_a_triggered_run_completes(tmp_path, cfg, source_tree):
    from prefect.deployments import run_deployment
    from prefect.settings import get_current_settings

    deployed = deploy_project(PROJECT, names=["pool-refresh"], source=str(REPO))
    assert [d.full_name for d in deployed] == ["pool-build/pool-refresh"]
    dep = _deployment("pool-build/pool-refresh")
    assert dep.work_pool_name == "scoder-cpu" and dep.entrypoint == "flows/pool.py:pool_flow"
    [sched] = dep.schedules
    assert (sched.schedule.cron, sched.schedule.timezone, sched.active) == ("0 1 * * 0", "Europe/Berlin", True)
    assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("scoder-cpu").type == "process"

    # A run through the API, picked up by a real process worker that polls once and waits for the run.
    cfg.pool.sources = [str(source_tree)]
    out = str(tmp_path / "pool")
    run = run_deployment(
        "pool-build/pool-refresh", parameters={"config": cfg.model_dump(mode="json"), "out": out}, timeout=0
    )
    env = {**os.environ, "PREFECT_API_URL": get_current_settings().api.url}
    worker = [sys.executable, "-m", "prefect", "worker", "start", "--pool", "scoder-cpu", "--type", "process"]
    proc = subprocess.run(
        [*worker, "--run-once", "--limit", "1"], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    assert state.is_completed(), f"{state}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    from synth_core.storage import read_manifest

    assert read_manifest(out).num_rows > 0


def test_cli_deploy_overrides_schedule_and_parameters(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("pool:\n  shard_files: 7\nstorage:\n  root: s3://bucket/work\n")
    args = ["deploy", "--name", "pool-refresh", "--source", str(REPO), "--file", str(PROJECT)]
    args += ["--cron", "30 3 * * *", "--timezone", "America/New_York", "--config", str(config), "--out", "s3://b/p"]
    t = time.perf_counter()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "pool-build/pool-refresh  pool=scoder-cpu  30 3 * * * (America/New_York)" in result.output
    dep = _deployment("pool-build/pool-refresh")
    [sched] = dep.schedules
    assert (sched.schedule.cron, sched.schedule.timezone) == ("30 3 * * *", "America/New_York")
    assert dep.parameters == {
        "config": {"pool": {"shard_files": 7}, "storage": {"root": "s3://bucket/work"}},
        "out": "s3://b/p",
    }
    assert time.perf_counter() - t < 30

    bad = CliRunner().invoke(app, ["deploy", "--name", "nope", "--file", str(PROJECT)])
    assert bad.exit_code == 2 and bad.output.strip().splitlines() == [f"error: {PROJECT}: no deployment named nope"]
