"""Code extraction: the code in a model's answer, found leniently because a small model rarely formats well.

extract_code takes the fenced block that defines the entry point, else an unclosed fence (cut by max_new_tokens),
else raw code, else a body continuation of the prompt. sanitize_code cuts trailing lines that do not parse and drops
top-level statements other than imports, definitions and assignments (examples, prints, asserts, `result = f(3)`),
so an example that fails or loops does not fail a correct function. complete_body turns a function body written
without its header (indented or dedented, comment- or blank-first, with column-0 comments) into the continuation
of the prompt's function; what follows it at column 0 is top-level code, kept or dropped as above.
bench/extraction.py measures this on HumanEval's canonical solutions written in each of those formats.

What it leaves to others: the program around the code and its execution (execution.py); it runs nothing.
"""

from __future__ import annotations

import ast
import re
from typing import Literal

from synth_core.evaluate.problems import Problem

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
