"""The evaluation flow: [fine-tune the student on a dataset ->] evaluate its last checkpoint -> artifacts.

Wiring only; the work is in synth_core.evaluate (its Stage, run by flows/stage.run_stage; the fine-tuning through
tasks/evaluate.py). Without data the student is evaluated as it is. Re-running with the same data, config and
student is free (both outputs are fingerprinted). The results (pass@1, pass@k, problems/s, the leakage report)
become a markdown artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.stage import run_stage
from synth_core import evaluate
from synth_core.config import parse_config
from tasks import evaluate as eval_tasks


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    config: dict[str, Any] | None = None, data: str | None = None, student: str | None = None, out: str | None = None
) -> str:
    """Fine-tune the student on `data` (unless none is given or fine_tune is off), evaluate it; return the URI."""
    cfg = parse_config(config)
    model = student or cfg.evaluation.student
    if data and cfg.evaluation.fine_tune:
        model = evaluate.last_checkpoint(eval_tasks.train_student(cfg, data, model), cfg)
        get_run_logger().info("student fine-tuned on %s: evaluating its last checkpoint %s", data, model)
    return run_stage(evaluate.STAGE, evaluate.plan_eval(cfg, model, out, data), cfg).out_uri
