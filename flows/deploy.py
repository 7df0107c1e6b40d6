"""`scoder deploy`: register the deployments of deployments/prefect.yaml on the Prefect server at PREFECT_API_URL.

Reads the project file (Prefect 3's prefect.yaml format plus a `work_pools` list that `prefect deploy` ignores),
creates the work pools that are missing, and creates or updates each deployment with its schedules, parameters,
tags, concurrency limit and work pool. No image is built or pushed: workers run the code that their image or
host already has, at the directory of the file's `set_working_directory` pull step (or `--source`).

Each deployment's flow is loaded here from its entrypoint (file path:function) in the checkout that holds the
project file (deployments/.. ), for its parameter schema; so the project file alone says which flows exist and
this module imports no flow by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from synth_core.errors import ScoderError

DEFAULT_PROJECT_FILE = Path("deployments") / "prefect.yaml"
WORKDIR_STEP = "prefect.deployments.steps.set_working_directory"


class DeployError(ScoderError, ValueError):
    """The project file or the server refused a deployment; the message says which and why."""


@dataclass(frozen=True)
class PoolSpec:
    name: str
    type: str = "process"
    description: str | None = None
    concurrency_limit: int | None = None


@dataclass(frozen=True)
class ScheduleSpec:
    cron: str
    timezone: str | None = None
    active: bool = True


@dataclass
class DeploymentSpec:
    name: str
    entrypoint: str  # "flows/round.py:round_flow", relative to the source directory
    work_pool: str
    work_queue: str | None = None
    job_variables: dict[str, Any] = field(default_factory=dict)
    schedules: list[ScheduleSpec] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    description: str | None = None
    concurrency_limit: int | None = None


@dataclass
class Project:
    path: Path
    pools: list[PoolSpec]
    deployments: list[DeploymentSpec]
    source: str | None  # the pull step's working directory


@dataclass(frozen=True)
class Deployed:
    """What was registered: '<flow name>/<deployment name>', its id, pool and schedules."""

    full_name: str
    id: str
    work_pool: str
    schedules: list[ScheduleSpec]


def _require(mapping: dict, key: str, where: str) -> Any:
    if not isinstance(mapping, dict) or mapping.get(key) in (None, ""):
        raise DeployError(f"{where}: '{key}' is required")
    return mapping[key]


def load_project(path: str | Path = DEFAULT_PROJECT_FILE) -> Project:
    """Read and check a project file: every deployment names an entrypoint and a work pool, schedules are cron."""
    p = Path(path)
    if not p.is_file():
        raise DeployError(f"project file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise DeployError(f"{p}: not valid YAML: {err}".splitlines()[0]) from None
    if not isinstance(data, dict) or not isinstance(data.get("deployments"), list) or not data["deployments"]:
        raise DeployError(f"{p}: expected a mapping with a non-empty 'deployments' list")

    pools = [
        PoolSpec(
            name=_require(w, "name", f"{p}: work_pools[{i}]"),
            type=w.get("type", "process"),
            description=w.get("description"),
            concurrency_limit=w.get("concurrency_limit"),
        )
        for i, w in enumerate(data.get("work_pools") or [])
    ]
    source = None
    for step in data.get("pull") or []:
        if isinstance(step, dict) and WORKDIR_STEP in step:
            source = (step[WORKDIR_STEP] or {}).get("directory")

    deployments = []
    for i, d in enumerate(data["deployments"]):
        where = f"{p}: deployments[{i}]"
        name = _require(d, "name", where)
        where = f"{p}: deployment '{name}'"
        pool = _require(d.get("work_pool") or {}, "name", f"{where}: work_pool")
        schedules = []
        for s in d.get("schedules") or ([d["schedule"]] if d.get("schedule") else []):
            if not isinstance(s, dict) or not s.get("cron") or set(s) - {"cron", "timezone", "active"}:
                raise DeployError(f"{where}: a schedule is a mapping of cron (required), timezone and active; got {s}")
            schedules.append(ScheduleSpec(s["cron"], s.get("timezone"), bool(s.get("active", True))))
        params = d.get("parameters") or {}
        if not isinstance(params, dict):
            raise DeployError(f"{where}: 'parameters' must be a mapping")
        deployments.append(
            DeploymentSpec(
                name=name,
                entrypoint=_require(d, "entrypoint", where),
                work_pool=pool,
                work_queue=d["work_pool"].get("work_queue_name"),
                job_variables=d["work_pool"].get("job_variables") or {},
                schedules=schedules,
                parameters=params,
                tags=list(d.get("tags") or []),
                description=d.get("description"),
                concurrency_limit=d.get("concurrency_limit"),
            )
        )
    return Project(p, pools, deployments, source)


def ensure_work_pools(pools: list[PoolSpec], needed: set[str]) -> list[str]:
    """Create the work pools in `needed` that the server does not have yet; return the names created.

    A needed pool that the project file does not describe is created as a process pool.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.asyncutils import run_coro_as_sync
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    specs = {s.name: s for s in pools}
    created = []
    with get_client(sync_client=True) as client:
        for name in sorted(needed):
            try:
                client.read_work_pool(name)
                continue
            except ObjectNotFound:
                pass
            spec = specs.get(name, PoolSpec(name))
            template = run_coro_as_sync(get_default_base_job_template_for_infrastructure_type(spec.type))
            if template is None:
                raise DeployError(
                    f"work pool '{name}': no job template for type '{spec.type}' "
                    "(install its worker package, e.g. prefect-docker, or use type: process)"
                )
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=spec.type,
                    description=spec.description,
                    concurrency_limit=spec.concurrency_limit,
                    base_job_template=template,
                )
            )
            created.append(name)
    return created


def deploy_project(
    path: str | Path = DEFAULT_PROJECT_FILE,
    names: list[str] | None = None,
    source: str | Path | None = None,
    cron: str | None = None,
    timezone: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> list[Deployed]:
    """Register the project's deployments (those in `names`, default all) on the server at PREFECT_API_URL.

    `source`: the directory workers run the code from (default: the project file's pull step). `cron`,
    `timezone`: replace the schedules' values. `parameters`: merged over each deployment's own.
    """
    from prefect import Flow
    from prefect.runner.storage import LocalStorage
    from prefect.schedules import Cron
    from prefect.settings import get_current_settings

    project = load_project(path)
    if not get_current_settings().api.url:
        # Without it Prefect would register on a temporary server that is gone when this command ends.
        raise DeployError("PREFECT_API_URL is not set: point it at the Prefect server (e.g. http://HOST:4200/api)")
    chosen = project.deployments
    if names:
        unknown = sorted(set(names) - {d.name for d in chosen})
        if unknown:
            raise DeployError(f"{project.path}: no deployment named {', '.join(unknown)}")
        chosen = [d for d in chosen if d.name in names]
    worker_dir = source if source is not None else project.source
    if not worker_dir:
        raise DeployError(f"{project.path}: no set_working_directory pull step; pass --source DIR")
    code_dir = project.path.resolve().parent.parent  # the checkout: deployments/prefect.yaml -> .

    ensure_work_pools(project.pools, {d.work_pool for d in chosen})
    deployed = []
    for d in chosen:
        schedules = [
            ScheduleSpec(cron or s.cron, timezone if timezone is not None else s.timezone, s.active)
            for s in d.schedules
        ]
        file = d.entrypoint.split(":", 1)[0]
        if not (code_dir / file).is_file():
            raise DeployError(f"deployment '{d.name}': entrypoint {d.entrypoint} not found under {code_dir}")
        try:
            flow = Flow.from_source(source=LocalStorage(str(code_dir)), entrypoint=d.entrypoint)
            runner = flow.to_deployment(
                name=d.name,
                schedules=[Cron(s.cron, timezone=s.timezone, active=s.active) for s in schedules],
                parameters={**d.parameters, **(parameters or {})},
                description=d.description,
                tags=d.tags,
                concurrency_limit=d.concurrency_limit,
                work_pool_name=d.work_pool,
                work_queue_name=d.work_queue,
                job_variables=d.job_variables,
            )
            # Workers find the code at worker_dir (their image's copy), not at this checkout's path.
            runner.storage = LocalStorage(str(worker_dir))
            dep_id = runner.apply(work_pool_name=d.work_pool)
        except (ValueError, OSError, ImportError, AttributeError) as err:
            raise DeployError(f"deployment '{d.name}' ({d.entrypoint}): {err}") from err
        deployed.append(Deployed(f"{flow.name}/{d.name}", str(dep_id), d.work_pool, schedules))
    return deployed
