"""Prefect tasks of the evaluation: fine-tune the student, then evaluate a model (one task run each).

Thin wrappers over synth_core.evaluate. Both skip work whose output (fingerprinted) already exists, so no
Prefect result cache is used. Training and generation run in spawned subprocesses (synth_core.procs); the
sandbox runs every completion in processes of its own.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from synth_core import evaluate
from synth_core.config import RunConfig
from tasks.retry import RETRY


@task(name="train-student", **RETRY, cache_policy=NO_CACHE, tags=["gpu"])
def train_student(cfg: RunConfig, data: str, student: str | None = None) -> str:
    """Fine-tune the student on the dataset's kept rows (problem -> solution); return the train output."""
    return evaluate.train_student(cfg, data, student)


@task(name="evaluate", **RETRY, cache_policy=NO_CACHE, tags=["gpu"])
def evaluate_model(cfg: RunConfig, model: str, trained_on: str | None = None, out: str | None = None) -> str:
    """Generate, execute (sandboxed) and score every benchmark problem; return the results dataset."""
    return evaluate.run_eval(cfg, model, out, trained_on)
