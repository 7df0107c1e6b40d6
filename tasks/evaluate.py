"""Prefect task of the evaluation besides its stage (tasks/stage.py runs the evaluation itself): fine-tune the
student.

A thin wrapper over synth_core.evaluate. It skips work whose output (fingerprinted) already exists, so no Prefect
result cache is used. Training runs in spawned subprocesses (synth_core.procs).
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
