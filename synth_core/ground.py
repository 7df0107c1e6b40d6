"""Execution-grounded asserts: a failing `assert CALL == LITERAL` gets as LITERAL what the code returns.

A small synthesizer often writes a function that runs and an assert whose expected value is simply wrong
(`assert add(2, 3) == 6`). Grounding keeps such a sample by making its asserts describe what its code does:

1. `find_sites`: every `assert LEFT == RIGHT` (one `==`, anywhere in the code) where one side is a plain literal
   (ast.literal_eval accepts it) and the other is not a literal and contains a call. Nothing runs here.
2. `probe_program`: the code with each site's assert replaced by a probe that records the repr of the computed
   side (only when it is a plain value: int, float, str, bool, None, and list/tuple/dict of those) and prints what it
   saw at exit, on one marked line. The probe runs ONLY in synth_core.sandbox, like every generated program.
3. `rewrite_code`: in this process, from the probe's line (untrusted text: read with json and ast.literal_eval,
   never executed), each site that was reached, computed exactly one distinct value, and whose value differs from its
   literal gets the literal's source span replaced by that value's repr (at most `max_chars` characters). The rest of
   the code keeps its text.
4. `ground_programs`: the rewritten code runs once more in the sandbox; only a program that then passes is grounded.

What this module deliberately does not do: decide whether the code solves the problem (the asserts now state what
it does; the judge's consistency aspect reads the problem against the solution), touch asserts of other shapes
(`assert f(x)`, `assert x in y`, loops over cases: they must pass as written), or change code that already passes.
The sample stage calls `ground_programs` on the rows whose asserts failed and records the count and the original
asserts per row (sample.ground_asserts).
"""

from __future__ import annotations

import ast
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from synth_core.config import SandboxConfig
from synth_core.parse import CODE_BLOCK

MARKER = "__SCODER_GROUND__"  # starts the probe's one output line
MAX_SITES = 32  # sites probed per program (a bound on the probe's output line, which the sandbox tail must hold)
_PROBE = "__scoder_probe__"


@dataclass(frozen=True)
class Site:
    """One `assert LEFT == RIGHT` whose `literal` side can be grounded; spans are character offsets into the code."""

    index: int  # ordinal among the code's sites
    assert_src: str  # the whole assert statement as written
    literal_src: str  # the expected side as written
    literal_start: int
    literal_end: int
    computed_src: str  # the side that calls the code


@dataclass
class Grounded:
    """What grounding did to one program. `code` is the rewritten program when `grounded` > 0 and it passed."""

    code: str
    grounded: int = 0  # asserts whose expected value was rewritten (0 = the program is unchanged)
    original_asserts: list[str] = field(default_factory=list)  # those asserts as the synthesizer wrote them
    status: str = "not_groundable"  # grounded | not_groundable | probe_failed | nothing_to_change | still_failing
    result: Any = None  # the sandbox's SandboxResult of the rewritten program (set when grounded)


def _parse(code: str) -> ast.Module | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError, SystemError):
        return None


def _is_literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return False
    return not isinstance(node, ast.Set)  # a set's repr has no fixed order


def _has_call(node: ast.expr) -> bool:
    return any(isinstance(n, ast.Call) for n in ast.walk(node))


def _offsets(code: str) -> list[int]:
    """Character offset of the start of each line (1-based line numbers index it)."""
    starts = [0, 0]
    for line in code.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    return starts


def _char_offset(code_lines: list[str], starts: list[int], lineno: int, col_bytes: int) -> int:
    """ast gives UTF-8 byte columns; the rewrite works on characters."""
    line = code_lines[lineno - 1]
    return starts[lineno] + len(line.encode("utf-8")[:col_bytes].decode("utf-8", errors="ignore"))


def find_sites(code: str) -> list[Site]:
    """The groundable asserts of `code`, in source order (empty when it does not parse or has none)."""
    tree = _parse(code)
    if tree is None:
        return []
    lines = code.splitlines(keepends=True)
    starts = _offsets(code)
    sites: list[Site] = []
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Assert)), key=lambda n: (n.lineno, n.col_offset))
    for node in nodes:
        test = node.test
        if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
            continue
        left, right = test.left, test.comparators[0]
        if _is_literal(right) and not _is_literal(left) and _has_call(left):
            literal, computed = right, left
        elif _is_literal(left) and not _is_literal(right) and _has_call(right):
            literal, computed = left, right
        else:
            continue
        if literal.end_lineno is None or literal.end_col_offset is None:
            continue
        start = _char_offset(lines, starts, literal.lineno, literal.col_offset)
        end = _char_offset(lines, starts, literal.end_lineno, literal.end_col_offset)
        sites.append(
            Site(
                index=len(sites),
                assert_src=ast.get_source_segment(code, node) or "",
                literal_src=code[start:end],
                literal_start=start,
                literal_end=end,
                computed_src=ast.get_source_segment(code, computed) or "",
            )
        )
        if len(sites) == MAX_SITES:
            break
    return sites


# Defined in the probe program (in the sandbox). `plain` checks the value's type exactly (no subclasses: their repr
# may be anything); the repr is cut at max_chars + 1 so that a huge value costs nothing and is refused here.
_PROBE_HELPERS = f"""
def {_PROBE}(i, v):
    def plain(x, depth=0):
        if depth > 4:
            return False
        t = type(x)
        if t in (int, float, str, bool, type(None)):
            return True
        if t in (list, tuple):
            return len(x) <= 64 and all(plain(y, depth + 1) for y in x)
        if t is dict:
            return len(x) <= 64 and all(plain(k, depth + 1) and plain(y, depth + 1) for k, y in x.items())
        return False
    seen = {_PROBE}.seen.setdefault(i, [])
    r = repr(v)[: {_PROBE}.max_chars + 1] if plain(v) else None
    if r not in seen:
        seen.append(r)


def {_PROBE}_report():
    import json, sys
    sys.stdout.write("\\n{MARKER}" + json.dumps({_PROBE}.seen) + "\\n")
    sys.stdout.flush()


{_PROBE}.seen = {{}}
import atexit as {_PROBE}_atexit
{_PROBE}_atexit.register({_PROBE}_report)
"""


class _ProbeAsserts(ast.NodeTransformer):
    """Replaces the assert at each site (matched by position) with a call recording the computed side."""

    def __init__(self, positions: dict[tuple[int, int], tuple[int, ast.expr]]):
        self.positions = positions

    def visit_Assert(self, node: ast.Assert) -> ast.AST:
        hit = self.positions.get((node.lineno, node.col_offset))
        if hit is None:
            return node
        index, computed = hit
        call = ast.Call(ast.Name(_PROBE, ast.Load()), [ast.Constant(index), computed], [])
        return ast.copy_location(ast.Expr(call), node)


def probe_program(code: str, sites: Sequence[Site], max_chars: int) -> str | None:
    """The program that records what each site computes (run it in the sandbox only); None if nothing to probe."""
    tree = _parse(code)
    if tree is None or not sites:
        return None
    lines = code.splitlines(keepends=True)
    starts = _offsets(code)
    by_span = {(s.literal_start, s.literal_end): s.index for s in sites}
    positions: dict[tuple[int, int], tuple[int, ast.expr]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare) and len(node.test.comparators) == 1:
            a, b = node.test.left, node.test.comparators[0]
            for literal, computed in ((b, a), (a, b)):
                if literal.end_lineno is None or literal.end_col_offset is None:
                    continue
                span = (
                    _char_offset(lines, starts, literal.lineno, literal.col_offset),
                    _char_offset(lines, starts, literal.end_lineno, literal.end_col_offset),
                )
                if span in by_span:
                    positions[(node.lineno, node.col_offset)] = (by_span[span], computed)
                    break
    if not positions:
        return None
    tree = _ProbeAsserts(positions).visit(tree)
    # The helpers go after a module docstring and `from __future__` imports, which must stay first.
    at = 0
    for i, stmt in enumerate(tree.body):
        docstring = i == 0 and isinstance(stmt, ast.Expr) and isinstance(getattr(stmt, "value", None), ast.Constant)
        if docstring or (isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__"):
            at = i + 1
        else:
            break
    helpers = ast.parse(_PROBE_HELPERS.replace(f"{_PROBE}.max_chars", str(max_chars))).body
    tree.body[at:at] = helpers
    ast.fix_missing_locations(tree)
    try:
        return ast.unparse(tree) + "\n"
    except (ValueError, RecursionError):
        return None


def read_probe(stdout_tail: str) -> dict[int, list[str | None]] | None:
    """The probe's record: site index -> the distinct reprs it computed (None = not a plain value); None when the
    line is missing or malformed (a program that killed itself, or wrote past the sandbox's tail)."""
    for line in reversed(stdout_tail.splitlines()):
        if line.startswith(MARKER):
            try:
                raw = json.loads(line[len(MARKER) :])
            except ValueError:
                return None
            if not isinstance(raw, dict):
                return None
            out: dict[int, list[str | None]] = {}
            for k, v in raw.items():
                if not (isinstance(k, str) and k.isdigit() and isinstance(v, list)):
                    return None
                out[int(k)] = [x if isinstance(x, str) else None for x in v]
            return out
    return None


def _value(src: str) -> tuple[bool, object]:
    try:
        return True, ast.literal_eval(src)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return False, None


def rewrite_code(code: str, sites: Sequence[Site], seen: dict[int, list[str | None]], max_chars: int) -> Grounded:
    """`code` with each groundable site's literal replaced by the value the probe saw (see the module doc)."""
    edits: list[tuple[Site, str]] = []
    for s in sites:
        values = seen.get(s.index, [])
        if len(values) != 1 or values[0] is None or len(values[0]) > max_chars:
            continue  # not reached, several values, not plain, or too long
        ok, got = _value(values[0])
        if not ok:
            continue  # nan, inf and the like have no literal repr
        _, want = _value(s.literal_src)
        if type(got) is type(want) and got == want:
            continue
        edits.append((s, values[0]))
    if not edits:
        return Grounded(code, status="nothing_to_change")
    out = code
    for s, new in sorted(edits, key=lambda e: -e[0].literal_start):
        out = out[: s.literal_start] + new + out[s.literal_end :]
    return Grounded(out, grounded=len(edits), original_asserts=[s.assert_src for s, _ in edits], status="grounded")


def ground_programs(codes: Sequence[str], cfg: SandboxConfig, max_chars: int = 80) -> list[Grounded]:
    """Ground every program whose asserts failed (callers pass only those): probe each in the sandbox, rewrite, run
    the rewritten programs in the sandbox; a result has grounded > 0 only when its rewritten program passed."""
    from synth_core.sandbox import run_programs

    results = [Grounded(code) for code in codes]
    probes: list[tuple[int, list[Site], str]] = []
    for i, code in enumerate(codes):
        sites = find_sites(code)
        program = probe_program(code, sites, max_chars) if sites else None
        if program is not None:
            probes.append((i, sites, program))
    ran = run_programs([p for _, _, p in probes], cfg) if probes else []
    confirm: list[int] = []
    for (i, sites, _), res in zip(probes, ran, strict=True):
        seen = read_probe(res.stdout_tail)
        if seen is None:
            results[i].status = "probe_failed"
            continue
        g = rewrite_code(codes[i], sites, seen, max_chars)
        if g.grounded:
            confirm.append(i)
        results[i] = g
    checked = run_programs([results[i].code for i in confirm], cfg) if confirm else []
    for i, res in zip(confirm, checked, strict=True):
        if res.passed:
            results[i].result = res
        else:
            results[i] = Grounded(codes[i], status="still_failing")
    return results


def replace_solution_code(response: str, code: str) -> str:
    """`response` with the code of its one fenced block replaced by `code` (what the block held after its code, its
    trailing whitespace, is kept; parse.solution_code strips it)."""
    blocks = list(CODE_BLOCK.finditer(response))
    if len(blocks) != 1:
        raise ValueError(f"a response with {len(blocks)} code blocks cannot be rewritten (one is needed)")
    m = blocks[0]
    body = m.group(1)
    tail = body[len(body.rstrip()) :]
    return response[: m.start(1)] + code.rstrip() + tail + response[m.end(1) :]
