"""Execution: the program the sandbox runs for one completion, and its verdict.

build_program puts the candidate (with what a HumanEval prompt defines around it: imports, helpers) before the
problem's test, or before a differential harness for evalplus records (the candidate's output on every base and plus
input must equal the canonical solution's; floats within atol, or a relative 1e-6). A random completion marker,
printed only after the test returned, catches a candidate that exits with status 0 before its test ends.
run_checks runs the programs in the sandbox (synth_core.sandbox.run_programs, in parallel) and reads the marker.

What it leaves to others: the sandbox's isolation and limits (synth_core.sandbox); nothing generated is executed in
this process.
"""

from __future__ import annotations

import ast
import re
import secrets
from dataclasses import dataclass

from synth_core.config import SandboxConfig
from synth_core.evaluate.errors import EvalError
from synth_core.evaluate.extraction import Extraction
from synth_core.evaluate.problems import Problem
from synth_core.sandbox import SandboxResult

_FLOAT_REL_TOL = 1e-6  # relative tolerance of float outputs in differential tests where atol is 0


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


def _last_line(text: str) -> str | None:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else None
