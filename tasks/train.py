"""Prefect task of the train stage: one task run per training job (the whole job is one GPU process).

Thin wrapper over synth_core.train.run_train, which trains in a spawned process and skips a job whose
output (fingerprinted by data, config and base model) already exists. No Prefect result cache: the
output's manifest is the record of what is done.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from synth_core import train
from synth_core.config import RunConfig
from tasks.retry import RETRY


@task(name="train", **RETRY, cache_policy=NO_CACHE, tags=["gpu"])
def train_task(cfg: RunConfig, data: list[str], base: str | None = None, out: str | None = None) -> str:
    """Fine-tune the synthesizer on `data`; return the train output (its checkpoints dataset)."""
    return train.run_train(cfg, data, base, out)
