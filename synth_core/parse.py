"""Parse a synthesizer's output into (instruction, response), or say why it cannot be used.

The synthesis prompt (prompts/oss_instruct.txt) asks for two sections, `[Problem Description]` and
`[Solution]`. Models write those headers in many ways (`**Problem Description:**`, `## Problem`,
`### Solution`, `[Solution]`), so headers are matched loosely at the start of a line, case-insensitive,
with markdown decorations stripped. What cannot be used is never dropped: it gets a reject reason and
a detail, and the caller keeps the raw output next to them.

Shared by the sample stage and the reference-set builder (a teacher's answers are parsed the same way).
Knows nothing of models or datasets.
"""

from __future__ import annotations

import ast
import re
import warnings
from dataclasses import dataclass

EMPTY = "empty"
TRUNCATED = "truncated"
NO_PROBLEM = "no_problem_section"
NO_SOLUTION = "no_solution_section"
NO_CODE = "no_code_block"
PROBLEM_TOO_SHORT = "problem_too_short"
TOO_LONG = "too_long"
# Junk that parses (screen_sample): each a reason of its own, so the funnel says what the synthesizer gets wrong.
TEMPLATE_ECHO = "template_echo"
RESTATES_PROMPT = "restates_prompt"
RESTATES_SNIPPET = "restates_snippet"
CODE_DOES_NOT_PARSE = "code_does_not_parse"
DEFINES_NOTHING = "defines_nothing"
NO_ASSERTS = "no_asserts"
REASONS = (EMPTY, TRUNCATED, NO_PROBLEM, NO_SOLUTION, NO_CODE, PROBLEM_TOO_SHORT, TOO_LONG)
SCREEN_REASONS = (TEMPLATE_ECHO, RESTATES_PROMPT, RESTATES_SNIPPET, CODE_DOES_NOT_PARSE, DEFINES_NOTHING, NO_ASSERTS)

# A header line: optional markdown (#, *, _, >, [, numbering), the section name, optional closing
# decorations and a colon; the section's text may start on the same line after the colon.
_DECOR = r"[ \t>#*_\[\]()0-9.]*"
_PROBLEM_HEADER = re.compile(
    rf"^{_DECOR}(?:problem(?:\s+(?:description|statement))?|task(?:\s+description)?|question)"
    rf"[ \t*_\]):]*(?:\n|$|(?<=:)[ \t]*|(?<=:\*\*)[ \t]*)",
    re.IGNORECASE | re.MULTILINE,
)
_SOLUTION_HEADER = re.compile(
    rf"^{_DECOR}(?:solution|answer|implementation)[ \t*_\]):]*(?:\n|$|(?<=:)[ \t]*|(?<=:\*\*)[ \t]*)",
    re.IGNORECASE | re.MULTILINE,
)
CODE_BLOCK = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)  # a fenced block; group 1 = its code


def synthesis_regex(
    language: str | None = "python", max_problem_lines: int = 3, max_intro_lines: int = 2, max_code_lines: int = 30
) -> str:
    """The synthesis format as a regex, for constrained decoding (vLLM structured outputs, xgrammar in transformers).

    `[Problem Description]`, 1-`max_problem_lines` lines of prose, `[Solution]`, at most `max_intro_lines` lines of
    explanation, then ONE fenced block of the language of at most `max_code_lines` lines holding at least one
    `assert` line (at any indentation). A prose line may not start with a backtick or `[` (neither code nor the next
    header hides in the problem) and has at most 700 characters; a code line may not start with a backtick (the
    fence cannot close early) and has at most 160. Every part is bounded, so a model that would ramble must close
    the answer instead of running into max_new_tokens (measured on the built-in 135M base model: unbounded, 56 of
    64 answers were cut off at 384 tokens). After the closing fence the grammar ends, so the model stops. Written
    for xgrammar's regex dialect (no lookarounds; compiling it takes about a second, once per engine);
    parse_synthesis accepts every string this matches, and more (unconstrained engines, teachers).
    """
    lang = re.escape((language or "").strip())
    prose = r"[^\n`\[][^\n]{0,700}\n\n?"
    code = r"(?:[^\n`][^\n]{0,160})?\n"
    half = max(1, max_code_lines // 2)  # lines before the first assert line, and after it
    return (
        rf"\[Problem Description\]\n(?:{prose}){{1,{max_problem_lines}}}\n?"
        rf"\[Solution\]\n(?:{prose}){{0,{max_intro_lines}}}"
        rf"```{lang}\n(?:{code}){{0,{max_code_lines - 1}}}[ \t]*assert [^\n]{{0,160}}\n(?:{code}){{0,{half}}}```\n?"
    )


@dataclass(frozen=True)
class ParsedSample:
    """instruction and response when usable; otherwise reject_reason + detail (and whatever was found)."""

    instruction: str | None
    response: str | None
    reject_reason: str | None = None
    detail: str | None = None


def _reject(reason: str, detail: str, instruction: str | None = None, response: str | None = None) -> ParsedSample:
    return ParsedSample(instruction, response, reason, detail)


def parse_synthesis(
    text: str | None,
    finish_reason: str = "stop",
    *,
    min_instruction_chars: int = 40,
    max_instruction_chars: int = 6000,
    max_response_chars: int = 12000,
) -> ParsedSample:
    """Split a `[Problem Description] ... [Solution] ...` output; reject what cannot be a training pair.

    A completion cut off at max_new_tokens (finish_reason "length") is rejected as truncated even if it
    parses: its solution may stop mid-function, and a half solution is worse than none.
    """
    if text is None or not text.strip():
        return _reject(EMPTY, "the output is empty or only whitespace")
    if finish_reason == "length":
        return _reject(TRUNCATED, "generation stopped at max_new_tokens before the end of the answer")
    problem = _PROBLEM_HEADER.search(text)
    solution = _SOLUTION_HEADER.search(text, problem.end() if problem else 0)
    if problem is None:
        return _reject(NO_PROBLEM, "no [Problem Description] header")
    if solution is None:
        return _reject(
            NO_SOLUTION, "no [Solution] header after the problem", instruction=text[problem.end() :].strip()
        )
    instruction = _strip_section(text[problem.end() : solution.start()])
    response = _strip_section(text[solution.end() :])
    if len(instruction) < min_instruction_chars:
        return _reject(
            PROBLEM_TOO_SHORT,
            f"problem section has {len(instruction)} characters (< {min_instruction_chars})",
            instruction,
            response,
        )
    if not CODE_BLOCK.search(response):
        return _reject(NO_CODE, "the solution has no closed ``` code block", instruction, response)
    if len(instruction) > max_instruction_chars:
        return _reject(
            TOO_LONG, f"problem has {len(instruction)} characters (> {max_instruction_chars})", instruction, response
        )
    if len(response) > max_response_chars:
        return _reject(
            TOO_LONG, f"solution has {len(response)} characters (> {max_response_chars})", instruction, response
        )
    return ParsedSample(instruction, response)


def _strip_section(s: str) -> str:
    """Trim a section: blank lines, stray markdown rules and dangling header decorations at its ends."""
    s = s.strip()
    s = re.sub(r"^(?:[-*_=]{3,}\s*)+", "", s)
    s = re.sub(r"(?:\s*[-*_=]{3,})+$", "", s)
    return s.strip()


def extract_code(response: str) -> str | None:
    """The first fenced code block of a response (without its fences), or None."""
    m = CODE_BLOCK.search(response or "")
    return m.group(1) if m else None


# ---- screening: what parses but is still junk ---------------------------------------------------------------------

# A placeholder line: the whole line is a bracketed phrase that starts like an instruction to the writer, as the
# skeleton lines of earlier prompts did ("(the problem, in a few sentences)", "[the code, with assertions]",
# "(your code here)") and a small model copies. Code lines such as "(a, b)" or "[x]" do not start that way.
_PLACEHOLDER = re.compile(
    r"^[ \t]*(?:#[ \t]*)?[(\[<{][ \t]*(?:the|a|an|your|insert|write|put|add|code|solution|problem)[ \t]+[a-z]"
    r"[^()\[\]<>{}\n]{0,80}[)\]>}][ \t]*\.?[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+")


def solution_code(response: str) -> str:
    """The solution's code: its fenced code blocks joined, or the whole response when it has none."""
    blocks = CODE_BLOCK.findall(response)
    return "\n\n".join(b.rstrip() for b in blocks) if blocks else response


def _ast(code: str) -> ast.Module:
    """ast.parse without the SyntaxWarnings (invalid escapes, ...) generated code is full of: they are not errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(code)


def parse_error(code: str) -> str | None:
    """Why `code` is not valid Python (None if it parses). ast only: nothing is executed."""
    try:
        _ast(code)
    except SyntaxError as err:
        return f"SyntaxError: {err.msg} (line {err.lineno})"
    except (ValueError, RecursionError, MemoryError, SystemError) as err:  # null bytes; absurd nesting
        return f"{type(err).__name__}: {err}"
    return None


def has_asserts(code: str) -> bool:
    """True when the (parsing) code holds at least one assert statement: a check it makes of itself."""
    try:
        return any(isinstance(node, ast.Assert) for node in ast.walk(_ast(code)))
    except (SyntaxError, ValueError, RecursionError, MemoryError, SystemError):
        return False


def is_python(language: str | None) -> bool:
    """True for the names pools give Python (None counts as Python: the default pool is the stdlib)."""
    return (language or "python").strip().lower() in ("python", "py", "python3")


def _shingles(text: str, n: int) -> set[tuple[str, ...]]:
    words = [w.lower() for w in _WORD.findall(text)]
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def copied_share(text: str, source: str, n: int = 4) -> float:
    """The share of `text`'s word n-grams found in `source` (0 when text has none): how much of it is copied."""
    mine = _shingles(text, n)
    return len(mine & _shingles(source, n)) / len(mine) if mine else 0.0


def screen_sample(
    instruction: str,
    response: str,
    *,
    snippet: str = "",
    prompt: str = "",
    language: str | None = "python",
    max_copied_share: float = 0.5,
) -> tuple[str, str] | None:
    """(reason, detail) when a parsed sample is junk, None when it may go on. Checks, in order: placeholder lines
    copied from a prompt (template_echo), a problem that is mostly the prompt's own wording (restates_prompt, word
    4-grams, share > max_copied_share) or mostly the snippet (restates_snippet), and for Python solutions: code that
    does not parse, code that defines no function or class (a script, or only asserts: nothing to learn to write),
    code without an assert (nothing to check it by). Nothing runs here (ast only)."""
    for where, text in (("problem", instruction), ("solution", response)):
        m = _PLACEHOLDER.search(text)
        if m:
            return TEMPLATE_ECHO, f"the {where} holds a placeholder line: {m.group(0).strip()[:80]!r}"
    if prompt:
        share = copied_share(instruction, prompt)
        if share > max_copied_share:
            return RESTATES_PROMPT, f"{share:.0%} of the problem's word 4-grams are the prompt's own"
    if snippet.strip():
        share = copied_share(instruction, snippet)
        if share > max_copied_share:
            return RESTATES_SNIPPET, f"{share:.0%} of the problem's word 4-grams are the snippet's"
    if not is_python(language):
        return None
    code = solution_code(response)
    error = parse_error(code)
    if error is not None:
        return CODE_DOES_NOT_PARSE, error
    tree = _ast(code)
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    if not any(isinstance(node, defs) for node in tree.body):
        return DEFINES_NOTHING, "the solution defines no function or class at its top level"
    if not any(isinstance(node, ast.Assert) for node in ast.walk(tree)):
        return NO_ASSERTS, "the solution has no assert statement to check it by"
    return None
