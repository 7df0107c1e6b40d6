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

import re
from dataclasses import dataclass

EMPTY = "empty"
TRUNCATED = "truncated"
NO_PROBLEM = "no_problem_section"
NO_SOLUTION = "no_solution_section"
NO_CODE = "no_code_block"
PROBLEM_TOO_SHORT = "problem_too_short"
TOO_LONG = "too_long"
REASONS = (EMPTY, TRUNCATED, NO_PROBLEM, NO_SOLUTION, NO_CODE, PROBLEM_TOO_SHORT, TOO_LONG)

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
