"""The synthesis parser on a table of well-formed, real (built-in model) and malformed outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synth_core.config import parse_config
from synth_core.parse import extract_code, parse_synthesis, screen_sample, synthesis_regex

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


# Real outputs of the built-in model (SmolLM2-135M-Instruct): the base model on the first prompt (tests/fixtures/
# oss_instruct_v1.txt, template "old") and a bootstrap checkpoint on the shipped one (template "new"), each with the
# reason the screen must give it ("ok" = passes the screen; its code then runs in the sandbox).
FIXTURES = Path(__file__).parent / "fixtures"
REAL_OUTPUTS = [json.loads(line) for line in (FIXTURES / "builtin_outputs.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("row", REAL_OUTPUTS, ids=[f"{r['expect']}-{i}" for i, r in enumerate(REAL_OUTPUTS)])
def test_screen_names_the_junk_in_real_outputs_of_the_builtin_model(row):
    from synth_core.sample import load_template, render_user_prompt

    template = (
        (FIXTURES / "oss_instruct_v1.txt").read_text() if row["template"] == "old" else load_template(parse_config({}))
    )
    # Headers are what the parser checks; truncation is not the screen's business, so every fixture is parsed whole.
    parsed = parse_synthesis(row["raw_output"], "stop", min_instruction_chars=0)
    assert parsed.instruction is not None and parsed.response is not None
    hit = screen_sample(
        parsed.instruction,
        parsed.response,
        snippet=row["snippet"],
        prompt=render_user_prompt(template, "", row["language"]),
        language=row["language"],
    )
    assert (hit[0] if hit else "ok") == row["expect"], hit
    if hit:
        assert hit[1]  # every rejection says why


def test_screen_reasons_on_written_examples():
    """The checks one by one, on small written cases (the real outputs above carry several faults at once)."""
    good = "```python\ndef f(x):\n    return x + 1\n\nassert f(1) == 2\n```"
    problem = "Write a function `f(x: int) -> int` that returns x plus one, for any integer x."
    assert screen_sample(problem, good) is None
    assert screen_sample(problem, "```python\nx = 1\nassert x == 1\n```")[0] == "defines_nothing"
    assert screen_sample(problem, "```python\ndef f(x):\n    return x + 1\n```")[0] == "no_asserts"
    assert screen_sample(problem, "```python\ndef f(x):\n    return x +\n```")[0] == "code_does_not_parse"
    assert screen_sample(problem, "```python\n(the code and its asserts)\n```")[0] == "template_echo"
    assert screen_sample("(the problem, in a few sentences)", good)[0] == "template_echo"
    assert screen_sample(problem, "```python\n(a, b)\ndef f(x):\n    return x\n\nassert f(1)\n```") is None
    snippet = "for key, value in sorted(settings.items()):\n    lines.append(f'{key}={value}')\n"
    assert screen_sample("for key, value in sorted(settings.items()): lines.append", good, snippet=snippet)[0] == (
        "restates_snippet"
    )
    assert screen_sample(problem, good, language="rust") is None  # only Python code is checked by ast


def test_the_synthesis_regex_accepts_the_builtin_reference_set_and_what_the_parser_reads():
    """Every built-in R example (the format the bootstrap teaches) matches the constraint, and whatever matches the
    constraint parses; an answer without an assert line does not match."""
    import re

    from synth_core.reference import format_synthesis, load_reference

    regex = synthesis_regex("python")
    rows = load_reference("reference:builtin-short").to_pylist()
    for r in rows:
        text = format_synthesis(r["instruction"], r["response"])
        assert re.fullmatch(regex, text), r["ref_id"]
        assert parse_synthesis(text).reject_reason is None
    no_assert = "[Problem Description]\nWrite f returning one.\n\n[Solution]\n```python\ndef f():\n    return 1\n```"
    assert not re.fullmatch(regex, no_assert)
