"""The bootstrap flow: the reference set R -> train -> M checkpoints, the first synthesizer of a run.

Wiring only. The train output is the registry of the checkpoints (a dataset with one row per
checkpoint, in training order, with the mean learning rate of its span); the next sample stage reads
them from there (synth_core.train.checkpoints_of). Re-running with the same R, config and base model is
free.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from synth_core.config import parse_config
from synth_core.reference import BUILTIN_REFERENCE
from synth_core.storage import read_dataset, read_manifest
from synth_core.train import checkpoints_of
from tasks.train import train_task


@flow(name="bootstrap", log_prints=True)
def bootstrap_flow(config: dict[str, Any] | None = None, reference: str | None = None, out: str | None = None) -> str:
    """Train the synthesizer's first checkpoints on R; return the train output's URI."""
    logger = get_run_logger()
    cfg = parse_config(config)
    uri = train_task(cfg, [reference or BUILTIN_REFERENCE], None, out)
    manifest = read_manifest(uri, cfg.storage)
    ckpts = checkpoints_of(uri, cfg)
    curve = manifest.stats.get("loss_curve", [])
    rows = read_dataset(uri, columns=["checkpoint", "step", "mean_lr"], storage=cfg.storage).to_pylist()
    create_table_artifact(
        key="bootstrap-checkpoints",
        table=rows,
        description=f"Bootstrap checkpoints in {uri}; loss {curve[0][1]:.3f} -> {curve[-1][1]:.3f}"
        if curve
        else f"Bootstrap checkpoints in {uri}",
    )
    logger.info(
        "bootstrap: %d checkpoints in %s, %s tokens/s, loss curve %s",
        len(ckpts),
        uri,
        manifest.stats.get("tokens_per_s"),
        [round(loss, 3) for _, loss in curve],
    )
    return uri
