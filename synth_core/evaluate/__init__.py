"""Evaluation: does a model write code that passes benchmark tests? pass@1 (greedy) and pass@k (sampled).

plan_eval -> evaluate_shard (generate, extract, execute, write) -> commit_eval, as the synth_core.stage.Stage
`STAGE` (one shard), or run_eval for all of it in this process; train_student fine-tunes a student on a dataset
first (synth_core.train, problem -> solution chats); leakage_report measures the n-gram overlap of a dataset with
each benchmark (synth_core.decontam's index).

One module per concept; each imports only modules above it in this list:
- errors.py      EvalError
- problems.py    benchmark problems (humaneval, mbpp, evalplus/HumanEval/MBPP files) and the prompt that asks for each
- extraction.py  the code in a model's answer (extract_code, complete_body, sanitize_code): lenient, because a
                 small model rarely formats well
- execution.py   the program the sandbox runs (candidate + test or differential harness, completion marker) and
                 its verdict (run_checks)
- passk.py       the unbiased pass@k estimator and the per-benchmark summary
- student.py     fine-tuning the student, its last checkpoint, and generation on one engine (generate_for_eval)
- leakage.py     the training data's n-gram overlap with each benchmark
- views.py       summary/leakage tables, markdown, the comparison records across runs and their plot
- stage.py       the stage: plan_eval -> evaluate_shard -> commit_eval (fingerprinted output), EvalStage/STAGE,
                 run_eval
This package re-exports every public name the single module synth_core/evaluate.py had, so
`from synth_core.evaluate import X` and `evaluate.X` keep working; new code may import from the submodule.

What it leaves to others: the Prefect tasks, flow and CLI (tasks/evaluate.py, flows/evaluate.py, flows/cli), the
sandbox (synth_core.sandbox), the engines (synth_core.generate), training (synth_core.train). It knows nothing of
Prefect, of rounds or of ablations.
"""

from synth_core.evaluate.errors import (
    EvalError,
)
from synth_core.evaluate.execution import (
    Verdict,
    build_program,
    run_checks,
)
from synth_core.evaluate.extraction import (
    Extraction,
    complete_body,
    extract_code,
    sanitize_code,
)
from synth_core.evaluate.leakage import (
    leakage_report,
    training_data,
)
from synth_core.evaluate.passk import (
    pass_at_k,
    summarize,
)
from synth_core.evaluate.problems import (
    COMPLETE_PROMPT,
    DESCRIBE_PROMPT,
    Problem,
    benchmark_source,
    load_problems,
    problem_from_record,
    render_prompt,
)
from synth_core.evaluate.stage import (
    PROMPT_TOO_LONG,
    STAGE,
    STAGE_VERSION,
    STATUS_ORDER,
    EvalPlan,
    EvalStage,
    commit_eval,
    evaluate_shard,
    plan_eval,
    run_eval,
)
from synth_core.evaluate.student import (
    generate_for_eval,
    last_checkpoint,
    train_student,
)
from synth_core.evaluate.views import (
    comparison_records,
    leakage_rows,
    plot_pass_at_1,
    records_markdown,
    results_markdown,
    summary_rows,
)

__all__ = [
    "COMPLETE_PROMPT",
    "DESCRIBE_PROMPT",
    "EvalError",
    "EvalPlan",
    "EvalStage",
    "Extraction",
    "PROMPT_TOO_LONG",
    "Problem",
    "STAGE",
    "STAGE_VERSION",
    "STATUS_ORDER",
    "Verdict",
    "benchmark_source",
    "build_program",
    "commit_eval",
    "comparison_records",
    "complete_body",
    "evaluate_shard",
    "extract_code",
    "generate_for_eval",
    "last_checkpoint",
    "leakage_report",
    "leakage_rows",
    "load_problems",
    "pass_at_k",
    "plan_eval",
    "plot_pass_at_1",
    "problem_from_record",
    "records_markdown",
    "render_prompt",
    "results_markdown",
    "run_checks",
    "run_eval",
    "sanitize_code",
    "summarize",
    "summary_rows",
    "train_student",
    "training_data",
]
