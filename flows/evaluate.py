"""The evaluation flow: [fine-tune the student on a dataset ->] evaluate its last checkpoint -> artifacts.

Wiring only; the work is in synth_core.evaluate through tasks/evaluate.py. Without data the student is
evaluated as it is. Re-running with the same data, config and student is free (both outputs are
fingerprinted). The results (pass@1, pass@k, problems/s, the leakage report) become a markdown artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from synth_core import evaluate
from synth_core.config import parse_config
from synth_core.storage import read_manifest
from tasks import evaluate as eval_tasks


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    config: dict[str, Any] | None = None, data: str | None = None, student: str | None = None, out: str | None = None
) -> str:
    """Fine-tune the student on `data` (unless none is given or fine_tune is off), evaluate it; return the URI."""
    logger = get_run_logger()
    cfg = parse_config(config)
    model = student or cfg.evaluation.student
    if data and cfg.evaluation.fine_tune:
        train_out = eval_tasks.train_student(cfg, data, model)
        model = evaluate.last_checkpoint(train_out, cfg)
        logger.info("student fine-tuned on %s: evaluating its last checkpoint %s", data, model)
    uri = eval_tasks.evaluate_model(cfg, model, data, out)
    stats = read_manifest(uri, cfg.storage).stats
    create_markdown_artifact(
        key="eval-results", markdown=evaluate.results_markdown(uri, stats), description=f"Evaluation of {model}"
    )
    for rec in evaluate.summary_rows(stats):
        logger.info("evaluation of %s: %s", model, ", ".join(f"{k} {v}" for k, v in rec.items()))
    return uri
