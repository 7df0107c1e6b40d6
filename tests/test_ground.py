"""Execution-grounded asserts (synth_core.ground): which asserts are sites, the probe, the rewrite, the sandbox runs.

The programs run in the real sandbox (synth_core.sandbox), as in the sample stage. tests/fixtures/ground_outputs.jsonl
holds real answers of the built-in model (SmolLM2-135M bootstrap checkpoints, the demo round) whose asserts failed,
with what grounding must make of each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synth_core import ground
from synth_core.config import SandboxConfig
from synth_core.parse import solution_code

FIXTURES = Path(__file__).parent / "fixtures"


def test_sites_are_equality_asserts_between_a_call_and_a_literal():
    code = (
        "def f(x):\n    return x * 2\n\n"
        "assert f(2) == 5\n"  # a site
        "assert [1, -2] == f(3)\n"  # literal on the left: a site
        "assert f(1)\n"  # a predicate: 'truth'
        "assert not f(0)\n"  # 'truth', negated
        "assert f(1) is None\n"  # 'is' a singleton
        "assert f(1) != 3\n"  # not ==
        "assert f(1) == f(1)\n"  # no literal
        "y = 4\nassert y == 4\n"  # no call
        "assert f(2) == {1, 2}\n"  # a set: its repr has no order
        "assert 1 < f(1) == 2\n"  # chained
        "assert not f(1) or f(2)\n"  # not a bare call
        "assert f(1) is 3\n"  # `is` with a non-singleton
    )
    sites = ground.find_sites(code)
    assert [s.assert_src for s in sites] == [
        "assert f(2) == 5", "assert [1, -2] == f(3)", "assert f(1)", "assert not f(0)", "assert f(1) is None",
    ]  # fmt: skip
    assert [(s.kind, s.literal_src, s.negated) for s in sites] == [
        ("eq", "5", False), ("eq", "[1, -2]", False), ("truth", "f(1)", False), ("truth", "not f(0)", True),
        ("is", "None", False),
    ]  # fmt: skip
    assert all(code[s.literal_start : s.literal_end] == s.literal_src for s in sites)
    assert [s.kind for s in ground.find_sites(code, predicates=False)] == ["eq", "eq"]
    assert ground.find_sites("def f(:\n") == []


def test_predicates_get_the_bool_they_returned():
    """`assert CALL` whose call returned False gets a `not`, `assert not CALL` that returned True loses it, `is` takes
    the singleton returned; a truthy non-bool (a list, 1) is not a verdict and is left alone."""
    code = "assert f(1)\nassert not f(2)\nassert f(3) is True\nassert f(4)\nassert f(5) is None\nassert f(6)\n"
    sites = ground.find_sites(code)
    seen = {0: ["False"], 1: ["True"], 2: ["None"], 3: ["[]"], 4: ["1"], 5: ["True"]}
    g = ground.rewrite_code(code, sites, seen, 80)
    assert (
        g.code == "assert not f(1)\nassert f(2)\nassert f(3) is None\nassert f(4)\nassert f(5) is None\nassert f(6)\n"
    )
    assert g.original_asserts == ["assert f(1)", "assert not f(2)", "assert f(3) is True"]


def test_spans_are_characters_not_utf8_bytes():
    """ast's columns count UTF-8 bytes; the rewrite cuts characters (a non-ASCII string before the literal)."""
    code = 'def f(s):\n    return s.upper()\n\nassert f("é") + "ü" == "Éx"\n'
    (site,) = ground.find_sites(code)
    assert site.literal_src == '"Éx"'
    g = ground.rewrite_code(code, [site], {0: ["'ÉÜ'"]}, 80)
    assert g.code.endswith('assert f("é") + "ü" == \'ÉÜ\'\n')


def test_rewrite_keeps_what_is_right_and_refuses_what_cannot_be_a_literal():
    code = "".join(f"assert f({i}) == {e}\n" for i, e in ((1, 1), (2, 3), (3, 0), (4, 0), (5, 0), (6, 1)))
    sites = ground.find_sites(code)
    seen = {
        0: ["1"],  # already right: unchanged
        1: ["4"],  # wrong: grounded
        2: ["1", "2"],  # two values (called twice with different results): left alone
        3: [None],  # not a plain value: left alone
        4: ["nan"],  # no literal repr: left alone
        # 5 not reached: left alone
    }
    g = ground.rewrite_code(code, sites, seen, 80)
    assert g.grounded == 1 and g.original_asserts == ["assert f(2) == 3"]
    assert g.code == code.replace("f(2) == 3", "f(2) == 4")
    assert ground.rewrite_code(code, sites, {1: ["'" + "x" * 100 + "'"]}, 80).grounded == 0  # too long
    assert ground.rewrite_code(code, sites, {5: ["True"]}, 80).grounded == 1  # True == 1, but not the same type


def test_probe_runs_in_the_sandbox_and_grounds_only_what_then_passes():
    cfg = SandboxConfig()
    fixed = '"""Doc."""\nfrom __future__ import annotations\n\ndef add(a, b):\n    return a + b\n\n'
    fixed += "assert add(2, 3) == 6\n"
    inside = "def sq(x):\n    return x * x\n\ndef test():\n    assert sq(3) == 6\n    assert sq(2) == 4\n\ntest()\n"
    raises = "def f(x):\n    raise ValueError(x)\n\nassert f(1) == 2\n"
    other = "def f(x):\n    return x\n\nassert f(1) == 2\nassert f(2) > 5\n"  # the other assert still fails
    pred = "def even(x):\n    return x % 2 == 0\n\nassert even(3)\nassert not even(4)\nassert even(2)\n"
    custom = "class P:\n    pass\n\ndef f():\n    return P()\n\nassert f() == 1\n"  # not a plain value
    out = ground.ground_programs([fixed, inside, raises, other, custom, pred], cfg)
    statuses = ["grounded", "grounded", "nothing_to_change", "still_failing", "nothing_to_change", "grounded"]
    assert [g.status for g in out] == statuses
    assert out[5].code.endswith("assert not even(3)\nassert even(4)\nassert even(2)\n")
    assert ground.ground_programs([pred], cfg, predicates=False)[0].status == "not_groundable"
    assert out[0].code.endswith("assert add(2, 3) == 5\n") and out[0].result.passed
    assert out[1].code.count("assert sq(3) == 9") == 1 and out[1].original_asserts == ["assert sq(3) == 6"]
    assert [g.grounded for g in out[2:5]] == [0, 0, 0] and out[3].code == other


def test_the_probe_line_is_untrusted_text():
    """What the probe prints is read with json and ast.literal_eval, never executed: an expression that is not a
    literal is not written into the code, a malformed line is no record; and a program that prints its own marker
    line first is read past (the probe's line comes last: its exit hook was registered first)."""
    code = "def f():\n    return 1\n\nassert f() == 2\n"
    sites = ground.find_sites(code)
    assert ground.rewrite_code(code, sites, {0: ["__import__('os').getcwd()"]}, 80).grounded == 0
    assert ground.read_probe(f"{ground.MARKER}{{not json") is None
    assert ground.read_probe(f"{ground.MARKER}[1, 2]") is None
    fake = f"import atexit\natexit.register(lambda: print('{ground.MARKER}' + '{{}}'))\n" + code
    (g,) = ground.ground_programs([fake], SandboxConfig())
    assert g.status == "grounded" and g.code.endswith("assert f() == 1\n")


def test_replace_solution_code_keeps_the_rest_of_the_response():
    response = "[Solution]\nIt adds.\n```python\nassert add(1, 2) == 4\n\n```\nDone."
    out = ground.replace_solution_code(response, "assert add(1, 2) == 3")
    assert out == "[Solution]\nIt adds.\n```python\nassert add(1, 2) == 3\n\n```\nDone."
    assert solution_code(out) == "assert add(1, 2) == 3"
    with pytest.raises(ValueError, match="2 code blocks"):
        ground.replace_solution_code("```python\na\n```\n```python\nb\n```", "c")


def _real() -> list[dict]:
    path = FIXTURES / "ground_outputs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("case", _real(), ids=lambda c: c["id"])
def test_real_outputs_of_the_builtin_model(case):
    """Real answers of the demo's bootstrap checkpoints (iteration 1 of `scoder run`, 32 answers: none passed its
    asserts as written, 4 did after `==` grounding, 10 with predicates too); each is grounded (and then passes) or not
    as recorded when the fixture was taken, with and without predicates."""
    code = solution_code(case["response"])
    assert ground.ground_programs([code], SandboxConfig(), predicates=False)[0].status == case["expect_eq"]
    (g,) = ground.ground_programs([code], SandboxConfig())
    assert g.status == case["expect"]
    if case["expect"] == "grounded":
        assert g.result.passed and g.grounded == case["grounded"]
