"""Shard tasks on a real local Ray cluster (execution.task_runner: ray) against a real Prefect API.

The test starts its own Ray head node (`ray start --head --block`, 2 CPUs, no GPU, its own temp folder and
ports) in a new process group and ends exactly that group afterwards. The pool flow runs once with the thread
runner and once with the Ray runner at the cluster's address: the outputs must be the same rows, the shard
task runs must be recorded in the flow's Prefect API, and the Ray workers' own log files must show that they,
not the test process, ran the shard tasks.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("prefect_ray", reason="prefect-ray is not installed (pip install '.[ray]')")

from conftest import free_port
from prefect.client.orchestration import get_client

pytestmark = pytest.mark.usefixtures("prefect_api")


class RayCluster:
    def __init__(self, address: str, temp_dir: Path):
        self.address = address
        self.temp_dir = temp_dir

    def worker_logs(self) -> dict[int, str]:
        """Stdout+stderr of every Ray worker process, by pid (Ray names the files worker-...-PID.out/.err)."""
        logs: dict[int, str] = {}
        for f in sorted((self.temp_dir / "session_latest" / "logs").glob("worker-*")):
            pid = int(f.stem.rsplit("-", 1)[1])
            logs[pid] = logs.get(pid, "") + f.read_text(errors="replace")
        return logs


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray head node on 127.0.0.1 with 2 CPUs and no GPU, in its own process group."""
    # Short path: Ray's unix sockets live under it (a socket path is at most 107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    port = free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [
        ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
        "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
        f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
    ]  # fmt: skip
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180  # 5-10 s when idle; much longer on 2 busy shared cores
        while b"Ray runtime started" not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield RayCluster(f"127.0.0.1:{port}", temp_dir)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=10)
                time.sleep(1)  # ray start --block exits first; its children follow
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def _task_run_names(flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(t.name for t in runs if t.state and t.state.is_completed())


def _rows(uri: str) -> list[dict]:
    from synth_core.storage import read_dataset

    return sorted(read_dataset(uri).to_pylist(), key=lambda r: (r["snippet_id"], r["source"] or ""))


def test_pool_flow_on_ray_matches_the_thread_runner(tmp_path, cfg, source_tree, ray_cluster):
    from flows.pool import pool_flow
    from flows.ray_runner import ShardRayTaskRunner
    from flows.runtime import make_task_runner

    for i in range(5):
        (source_tree / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i}\n\n\nVALUE_{i} = f{i}(2)\n")
    cfg.pool.sources = [str(source_tree)]
    cfg.pool.shard_files = 2

    threads_out = str(tmp_path / "pool-threads")
    state = pool_flow.with_options(task_runner=make_task_runner(cfg))(
        config=cfg.model_dump(mode="json"), out=threads_out, return_state=True
    )
    assert state.is_completed()

    cfg.execution.task_runner = "ray"
    cfg.execution.ray_address = ray_cluster.address
    cfg.storage.root = str(tmp_path / "data-ray")  # nothing shared with the first run
    runner = make_task_runner(cfg)
    assert isinstance(runner, ShardRayTaskRunner) and runner.address == ray_cluster.address
    ray_out = str(tmp_path / "pool-ray")
    state = pool_flow.with_options(task_runner=runner)(
        config=cfg.model_dump(mode="json"), out=ray_out, return_state=True
    )
    assert state.is_completed(), state
    assert _rows(ray_out) == _rows(threads_out)

    # The shard task runs are recorded in the flow's API (not in a temporary server of a Ray worker) ...
    shards = ["decontaminate-shard-0", "ingest-shard-0", "ingest-shard-1", "ingest-shard-2"]
    names = _task_run_names(state.state_details.flow_run_id)
    assert [n for n in names if "-shard-" in n] == shards
    # ... and ran in Ray worker processes: each one's completion is in a worker's own log, none in this process.
    ran_in = {
        shard: pid
        for pid, text in ray_cluster.worker_logs().items()
        for shard in shards
        if f"Task run '{shard}' - Finished in state Completed()" in text
    }
    assert sorted(ran_in) == shards, ray_cluster.worker_logs()
    assert os.getpid() not in ran_in.values()
    assert all("Starting temporary server" not in text for text in ray_cluster.worker_logs().values())


def test_gpu_tasks_ask_ray_for_gpus_and_fail_clearly_without_them(ray_cluster):
    from prefect import flow, task

    from flows.ray_runner import make_ray_task_runner

    runner = make_ray_task_runner(ray_cluster.address, None, cpus_per_task=0.5, gpus_per_task=0.25)
    assert runner.resources_for({"gpu"}) == {"num_cpus": 0.5, "num_gpus": 0.25}
    assert runner.resources_for({"cpu"}) == {"num_cpus": 0.5}
    assert runner.duplicate() == runner

    @task(tags=["gpu"])
    def on_gpu(x: int) -> int:
        return x + 1

    @flow
    def needs_a_gpu() -> int:
        return on_gpu.submit(1).result()

    # The cluster has no GPU: a clear error at submit time instead of a task waiting forever.
    with pytest.raises(RuntimeError, match=r"asks Ray for 0.25 GPU\(s\) but the cluster has 0"):
        needs_a_gpu.with_options(task_runner=runner)()

    # ray_gpus_per_shard = 0: GPU-tagged tasks run on the CPU workers.
    no_gpu = make_ray_task_runner(ray_cluster.address, None, cpus_per_task=1.0, gpus_per_task=0.0)
    assert needs_a_gpu.with_options(task_runner=no_gpu)() == 2
