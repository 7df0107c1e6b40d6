"""Shard tasks on a Ray cluster: prefect-ray's RayTaskRunner, with tasks tagged "gpu" asking Ray for their GPUs.

Flows stay unchanged: `execution.task_runner: ray` makes flows/runtime.make_task_runner return this
runner, and every task submitted through it carries Ray resource requests (prefect-ray's
`remote_options`): `ray_cpus_per_shard` CPUs each, plus `ray_gpus_per_shard` GPUs for a task tagged
"gpu" (sample, score, influence, train, evaluate). A GPU request the cluster can never meet is an
error at submit time, never a task that waits forever for a GPU that does not exist.

Imported only when the config asks for Ray (prefect-ray and ray are the optional extra `ray`).
Ray's workers must import this project's packages: on one machine they share the driver's
interpreter; on a cluster, run the worker image (docker/) or pass `ray_runtime_env`.
"""

from __future__ import annotations

import os
from typing import Any

import ray
from prefect_ray import RayTaskRunner
from prefect_ray.context import RemoteOptionsContext, remote_options

GPU_TAG = "gpu"
# Ray's workers must report to the flow's Prefect API. The serialized settings context that prefect-ray sends
# along does not carry a PREFECT_API_URL set after Prefect was imported (flows/runtime.run_flow sets it for its
# temporary server), and a worker without it starts a temporary Prefect server of its own (seen: 10 s each, and
# the task runs land there, not in the flow's API).
PROPAGATED_ENV = ("PREFECT_LOGGING_EXTRA_LOGGERS", "PREFECT_SERVER_ANALYTICS_ENABLED")


def prefect_env_for_workers() -> dict[str, str]:
    """Environment variables that point a Ray worker's Prefect at the flow's API (the current settings)."""
    from prefect.settings import get_current_settings

    api = get_current_settings().api
    env = {k: os.environ[k] for k in PROPAGATED_ENV if os.environ.get(k)}
    if api.url:
        env["PREFECT_API_URL"] = str(api.url)
    if api.key is not None:
        env["PREFECT_API_KEY"] = api.key.get_secret_value()
    if api.auth_string is not None:
        env["PREFECT_API_AUTH_STRING"] = api.auth_string.get_secret_value()
    return env


class ShardRayTaskRunner(RayTaskRunner):
    """RayTaskRunner whose tasks ask for `cpus_per_task` CPUs, and `gpus_per_task` GPUs when tagged "gpu"."""

    def __init__(
        self,
        address: str | None = None,
        init_kwargs: dict[str, Any] | None = None,
        cpus_per_task: float = 1.0,
        gpus_per_task: float = 0.0,
    ):
        super().__init__(address=address, init_kwargs=init_kwargs)
        self.cpus_per_task = cpus_per_task
        self.gpus_per_task = gpus_per_task

    def duplicate(self) -> ShardRayTaskRunner:
        return type(self)(self.address, self.init_kwargs, self.cpus_per_task, self.gpus_per_task)

    def __eq__(self, other: object) -> bool:
        return (
            super().__eq__(other)
            and isinstance(other, ShardRayTaskRunner)
            and (self.cpus_per_task, self.gpus_per_task) == (other.cpus_per_task, other.gpus_per_task)
        )

    def __enter__(self) -> ShardRayTaskRunner:
        env = prefect_env_for_workers()
        if env:
            runtime_env = dict(self.init_kwargs.get("runtime_env") or {})
            runtime_env["env_vars"] = {**env, **runtime_env.get("env_vars", {})}
            self.init_kwargs["runtime_env"] = runtime_env
        return super().__enter__()

    def resources_for(self, tags: set[str]) -> dict[str, float]:
        """Ray resource options of a task with these tags."""
        options = {"num_cpus": self.cpus_per_task}
        if GPU_TAG in tags and self.gpus_per_task > 0:
            options["num_gpus"] = self.gpus_per_task
        return options

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        options = self.resources_for(set(task.tags))
        gpus = options.get("num_gpus", 0)
        if gpus:
            have = ray.cluster_resources().get("GPU", 0.0)
            if have < gpus:
                raise RuntimeError(
                    f"task {task.name!r} asks Ray for {gpus} GPU(s) but the cluster has {have}: "
                    "set execution.ray_gpus_per_shard (0 = run GPU-tagged tasks without a GPU) or add GPU nodes"
                )
        # Options set by the caller (an outer `remote_options`) win over the defaults.
        outer = RemoteOptionsContext.get().current_remote_options
        with remote_options(**{**options, **outer}):
            return super().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)


def make_ray_task_runner(
    address: str | None,
    max_workers: int | None,
    cpus_per_task: float,
    gpus_per_task: float,
    runtime_env: dict[str, Any] | None = None,
) -> ShardRayTaskRunner:
    """The runner for `execution.task_runner: ray`: joins the cluster at `address`, or starts a local Ray with
    `max_workers` CPUs (None = all cores) for the run and stops it afterwards."""
    init_kwargs: dict[str, Any] = {"log_to_driver": True}
    if runtime_env:
        init_kwargs["runtime_env"] = runtime_env
    if address is None:
        # A local Ray for this run only: no dashboard (seconds of start-up and a port), our CPU budget.
        init_kwargs.update(include_dashboard=False, num_cpus=max_workers)
    return ShardRayTaskRunner(address, init_kwargs, cpus_per_task, gpus_per_task)
