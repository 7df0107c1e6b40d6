"""The synthesis parser on a table of well-formed, real (built-in model) and malformed outputs."""

from __future__ import annotations

import pytest

from synth_core.parse import extract_code, parse_synthesis

GOOD = """[Problem Description]
Write a function `area(radius)` that returns the area of a circle with the given radius, using math.pi.

[Solution]
```python
import math

def area(radius):
    return math.pi * radius ** 2

assert abs(area(1) - math.pi) < 1e-9
```
"""

BOLD = """**Problem Description:** Implement a `Stack` class with push, pop and peek methods; pop on an empty
stack raises IndexError.

**Solution:**
```python
class Stack:
    def __init__(self):
        self.items = []
```
"""

MARKDOWN_HEADERS = """## Problem Statement
Given a list of lines, print the index and text of every line that is not a comment (starts with '#').

### Solution
Loop with enumerate:
```python
def show(lines):
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            print(i, line)
```
---
"""

# Real outputs of the built-in SmolLM2-135M-Instruct for the OSS-Instruct prompt (sample stage, vLLM CPU).
REAL_NO_HEADER = (
    "This code snippet aims to generate a high-quality, optimized, and error-free programming solution that "
    "showcases the potential of Python, in a unique and creative way."
)
REAL_NO_CODE = (
    "\n[Problem Description]\n\nIn this problem, you'll create a high-quality programming challenge that "
    "highlights the value of careful coding and a clear, concise solution.\n\n## Step-by-Step Guide\n\n"
    "**Solution**\n\nThis is your ability to present a compelling and engaging solution to the challenge."
)
REAL_QUESTION_ONLY = (
    "Make yourself relevant to the programming code.\n\nQuestion:\nIn a multi-round conversation, ensure that "
    "you clearly define the intended audience and the code requirements.\n\nJustification:\n- The user expects "
    "a comprehensive and reproducible code example."
)
REAL_SHORT = "[Solution: Your solution is complete and correct.]"


@pytest.mark.parametrize(
    ("text", "finish", "reason", "instruction_start", "code_start"),
    [
        (GOOD, "stop", None, "Write a function `area(radius)`", "import math"),
        (BOLD, "stop", None, "Implement a `Stack` class", "class Stack"),
        (MARKDOWN_HEADERS, "stop", None, "Given a list of lines", "def show"),
        (GOOD, "length", "truncated", None, None),
        ("", "stop", "empty", None, None),
        ("   \n\t", "stop", "empty", None, None),
        (None, "stop", "empty", None, None),
        (REAL_NO_HEADER, "stop", "no_problem_section", None, None),
        (REAL_SHORT, "stop", "no_problem_section", None, None),
        (REAL_NO_CODE, "stop", "no_code_block", "In this problem", None),
        (REAL_QUESTION_ONLY, "stop", "no_solution_section", None, None),
        (
            "[Problem Description]\nToo short.\n[Solution]\n```python\npass\n```",
            "stop",
            "problem_too_short",
            None,
            None,
        ),
        (GOOD.replace("```\n", "", 1).rsplit("```", 1)[0], "stop", "no_code_block", None, None),  # unclosed fence
        ("\x00\x01 garbage \ufffd [[[ ]]] ### ***", "stop", "no_problem_section", None, None),
    ],
)
def test_parse_table(text, finish, reason, instruction_start, code_start):
    p = parse_synthesis(text, finish)
    assert p.reject_reason == reason, (p.reject_reason, p.detail)
    if reason is not None:
        assert p.detail
    if instruction_start:
        assert p.instruction.startswith(instruction_start)
    if code_start:
        assert extract_code(p.response).startswith(code_start)
        assert "[Solution]" not in p.instruction and "Solution" not in p.instruction.splitlines()[-1]


def test_too_long_sections_are_rejected_with_the_length():
    long_problem = GOOD.replace("using math.pi.", "using math.pi. " + "More words. " * 600)
    p = parse_synthesis(long_problem, max_instruction_chars=1000)
    assert p.reject_reason == "too_long" and "problem has" in p.detail
    p = parse_synthesis(GOOD, max_response_chars=20)
    assert p.reject_reason == "too_long" and "solution has" in p.detail
    assert p.instruction and p.response  # what was found is kept for inspection
