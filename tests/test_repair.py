"""Missing standard-library imports (synth_core.repair) and the sample stage's use of it (sample.add_imports).

tests/fixtures/repair_outputs.jsonl holds real answers of the built-in model (SmolLM2-135M, the demo round's
release, git bbde3fe) that died in the sandbox of a NameError, with the import lines the repair must add (none for
`chunk`: a variable the model forgot, and a dead-battery module). The repaired programs run in the real sandbox.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synth_core.config import RunConfig, SandboxConfig
from synth_core.repair import add_missing_imports, import_line
from synth_core.sample import add_imports

FIXTURES = [json.loads(line) for line in (Path(__file__).parent / "fixtures/repair_outputs.jsonl").open()]


@pytest.mark.parametrize("case", FIXTURES, ids=[c["error"] or "passed" for c in FIXTURES])
def test_real_answers_get_the_imports_their_error_names(case):
    fixed = add_missing_imports(case["code"])
    assert list(fixed.added) == case["added"]
    if not case["added"]:
        assert fixed.code == case["code"]
        return
    # The rest of the code keeps its text, after the new lines.
    assert fixed.code == "".join(f"{line}\n" for line in case["added"]) + case["code"]
    name = case["added"][0].split()[-1]
    assert f"name '{name}' is not defined" in case["error"]


def test_repaired_real_answers_no_longer_fail_on_the_name():
    from synth_core.sandbox import run_programs

    cases = [c for c in FIXTURES if c["added"]]
    before = run_programs([c["code"] for c in cases], SandboxConfig())
    after = run_programs([add_missing_imports(c["code"]).code for c in cases], SandboxConfig())
    for case, b, a in zip(cases, before, after, strict=True):
        name = case["added"][0].split()[-1]
        assert f"name '{name}' is not defined" in b.failure_tail
        assert f"name '{name}' is not defined" not in (a.failure_tail or "")
    # None passes as written; the one whose error was only the import then fails on its expected values, and
    # execution-grounded asserts (the sample stage's next step) keep it.
    from synth_core.ground import ground_programs

    grounded = ground_programs([add_missing_imports(c["code"]).code for c in cases], SandboxConfig(), 80, True)
    assert [g.grounded for g in grounded] == [0, 0, 3, 0, 0]
    assert cases[2]["added"] == ["import re"] and grounded[2].result.passed


def test_what_is_bound_anywhere_is_left_alone():
    code = (
        '"""Doc."""\n'
        "from __future__ import annotations\n"
        "import os.path as osp\n"
        "def f(re, *args, **kw):\n"
        "    math = 3\n"
        "    try:\n"
        "        return [json for json in args] + [sys.argv]\n"
        "    except ValueError as string:\n"
        "        return str(string) + osp.sep + collections.abc.__name__\n"
        "def g() -> Dict[str, Counter]:\n"
        "    return defaultdict(int)\n"
    )
    fixed = add_missing_imports(code)
    assert fixed.added == (  # sorted by name; collections.Counter, not typing's alias
        "from collections import Counter",
        "from typing import Dict",
        "import collections",
        "from collections import defaultdict",
        "import sys",
    )
    lines = fixed.code.splitlines()
    # After the docstring and the __future__ import; the code below is unchanged.
    assert lines[:2] == ['"""Doc."""', "from __future__ import annotations"]
    assert set(lines[2:7]) == set(fixed.added)
    assert "\n".join(lines[7:]) + "\n" == code.split("annotations\n", 1)[1]


@pytest.mark.parametrize(
    ("name", "bare", "line"),
    [
        ("os", False, "import os"),
        ("os", True, None),  # read bare: a variable the model forgot, not the module
        ("Optional", True, "from typing import Optional"),
        ("Path", True, "from pathlib import Path"),
        ("ABCMeta", True, "from abc import ABCMeta"),  # 3 of the demo release's NameErrors (git 0cb128c)
        ("this", False, None),  # importing it prints a poem
        ("chunk", False, None),  # removed in Python 3.13 (PEP 594)
        ("numpy", False, None),  # third-party: never guessed
        ("_thread", False, None),
    ],
)
def test_import_line(name, bare, line):
    assert import_line(name, bare) == line


def test_code_that_does_not_parse_is_returned_unchanged():
    assert add_missing_imports("def f(:\n    os.sep\n").added == ()
    assert add_missing_imports("print(1)\n").added == ()


def test_sample_rows_record_the_lines_and_only_single_block_responses_change():
    rows = [
        {"response": "Use os.\n\n```python\ndef f():\n    return os.sep\n\nassert f() == '/'\n```\n"},
        {"response": "```python\nx = math.pi\n```\n\n```python\nassert x\n```\n"},  # two blocks: left alone
        {"response": "```python\nassert abs(-1) == 1\n```\n"},
    ]
    add_imports(rows)
    assert rows[0]["imports_added"] == ["import os"]
    assert rows[0]["response"] == (
        "Use os.\n\n```python\nimport os\ndef f():\n    return os.sep\n\nassert f() == '/'\n```\n"
    )
    assert "imports_added" not in rows[1] and "imports_added" not in rows[2]
    assert RunConfig().sample.add_imports  # on by default


def test_repeated_asserts_are_dropped_word_for_word_only():
    """Module-level asserts that repeat an earlier one (the same expression and message, layout and comments aside)
    go; an assert with another message, one inside a function and one sharing a line through `;` stay."""
    from synth_core.repair import RepeatRepair, drop_repeated_asserts

    code = (
        "def f(x):\n    assert x == x\n    assert x == x\n    return x\n\n"
        "assert f(1) == 1\nassert f(1) == 1  # again\nassert f(2) == 2\nassert (f(1)\n        == 1)\n"
        "y = 1; assert f(1) == 1\nassert f(2) == 2, 'msg'\n"
    )
    fixed = drop_repeated_asserts(code)
    assert fixed.dropped == 2
    assert fixed.code == (
        "def f(x):\n    assert x == x\n    assert x == x\n    return x\n\n"
        "assert f(1) == 1\nassert f(2) == 2\ny = 1; assert f(1) == 1\nassert f(2) == 2, 'msg'\n"
    )
    assert drop_repeated_asserts("assert 1 ==\nassert 1 ==\n") == RepeatRepair("assert 1 ==\nassert 1 ==\n")
    assert drop_repeated_asserts(fixed.code).dropped == 0
