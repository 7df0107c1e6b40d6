"""Static repair of generated code: the standard-library imports it uses and forgot (before it runs), and the
assert statements it repeats word for word (drop_repeated_asserts, after it passed).

A small synthesizer often writes `os.path.join(...)` or `-> Set[str]` without the import. Measured on the demo's
release (git bbde3fe, 224 answers of the built-in 135M model): 15 of the 86 answers whose asserts failed died of
`NameError` on `os`, `math`, `io`, `re` or `Set` alone. `add_missing_imports` finds, with `ast` only (nothing runs
here), the names a program reads and never binds (not a builtin, not assigned, defined, imported or an argument
anywhere in it) and adds one import line for each that is

- a top-level standard-library module (`sys.stdlib_module_names`, public ones) that the code reads only as
  `NAME.attribute`: `import os`;
- a name of `typing` (`typing.__all__`): `from typing import Set`;
- one of a few well-known names of other standard modules (`KNOWN_NAMES`: `defaultdict`, `Path`, `dataclass`,
  `reduce`, ...): `from collections import defaultdict`.

The lines go after the module docstring and any `from __future__` import, so the rest of the code keeps its text
and its line order. An import the code never reaches costs nothing, so the repair is applied before the first run
(not only after a failure): a sample is then self-contained for training, whatever its asserts did.

What it deliberately does not do: guess third-party packages (`np`, `pd`), names of the snippet's own project, or
an attribute the code meant (`datetime.now()` with `import datetime` still fails, as it would have); decide
anything about the code's correctness (the sandbox does).
"""

from __future__ import annotations

import ast
import builtins
import sys
import warnings
from dataclasses import dataclass

REPAIR_VERSION = 2  # bump when the rules below change what is added: the sample stage's fingerprint holds it

# Names commonly used bare, from standard modules other than typing. A name both here and in typing (Counter,
# OrderedDict, ChainMap) comes from here: typing's alias can annotate but not be called (`Counter(words)`).
KNOWN_NAMES: dict[str, str] = {
    **dict.fromkeys(["defaultdict", "Counter", "OrderedDict", "deque", "namedtuple", "ChainMap"], "collections"),
    **dict.fromkeys(["dataclass", "field", "asdict", "astuple"], "dataclasses"),
    **dict.fromkeys(
        ["reduce", "partial", "lru_cache", "wraps", "cache", "cached_property", "total_ordering"], "functools"
    ),
    **dict.fromkeys(
        ["chain", "groupby", "permutations", "combinations", "product", "islice", "accumulate"], "itertools"
    ),
    **dict.fromkeys(["ABC", "ABCMeta", "abstractmethod"], "abc"),
    **dict.fromkeys(["Enum", "IntEnum", "auto"], "enum"),
    "Path": "pathlib",
    "Decimal": "decimal",
    "Fraction": "fractions",
    "StringIO": "io",
    "BytesIO": "io",
    "heappush": "heapq",
    "heappop": "heapq",
    "bisect_left": "bisect",
    "bisect_right": "bisect",
    "sqrt": "math",
    "floor": "math",
    "ceil": "math",
    "gcd": "math",
}


# Modules whose import does something (prints a poem, opens a browser) or needs a display, and the dead batteries
# of PEP 594 (removed in Python 3.13: training data should not teach them; `chunk` is also a common variable name).
_NEVER = frozenset(
    {"this", "antigravity", "idlelib", "tkinter", "turtle", "turtledemo"}
    | {"aifc", "audioop", "cgi", "cgitb", "chunk", "crypt", "imghdr", "mailcap", "msilib", "nis", "nntplib"}
    | {"ossaudiodev", "pipes", "sndhdr", "spwd", "sunau", "telnetlib", "uu", "xdrlib", "lib2to3"}
)
# PEP 695 type parameters (`def f[T](x: T)`) bind names too; ast has their classes from Python 3.12 on.
_TYPE_PARAMS = tuple(getattr(ast, n) for n in ("TypeVar", "ParamSpec", "TypeVarTuple") if hasattr(ast, n))


@dataclass(frozen=True)
class ImportRepair:
    """The repaired code and the import lines added (empty: `code` is the input, unchanged)."""

    code: str
    added: tuple[str, ...] = ()


def _typing_names() -> frozenset[str]:
    import typing

    return frozenset(typing.__all__)


def _bound_and_read(tree: ast.AST) -> tuple[set[str], set[str], set[str]]:
    """Names bound anywhere in the program (any scope), names read anywhere, and names read other than as
    `NAME.attribute` (a module is only ever read that way)."""
    bound: set[str] = set()
    read: set[str] = set()
    as_module = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    bare: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
            if isinstance(node.ctx, ast.Load) and id(node) not in as_module:
                bare.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.Global | ast.Nonlocal):
            bound.update(node.names)
        elif isinstance(node, ast.MatchAs | ast.MatchStar) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            bound.add(node.rest)
        elif isinstance(node, _TYPE_PARAMS):
            bound.add(node.name)
    return bound, read, bare


def import_line(name: str, read_bare: bool = False) -> str | None:
    """The import that binds `name` from the standard library, or None when it is not a known standard name.
    A module is imported only when the code reads it as `name.attribute` alone (`read_bare` False): a bare `chunk`
    or `token` is the model's own variable that it forgot to define, not the module of that name."""
    if name in KNOWN_NAMES:
        return f"from {KNOWN_NAMES[name]} import {name}"
    if name in _typing_names():
        return f"from typing import {name}"
    if not read_bare and name in sys.stdlib_module_names and not name.startswith("_") and name not in _NEVER:
        return f"import {name}"
    return None


def _insert_at(tree: ast.Module) -> int:
    """Line index (0-based) after the module docstring and the `from __future__` imports."""
    at = 0
    for i, node in enumerate(tree.body):
        is_doc = i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        is_future = isinstance(node, ast.ImportFrom) and node.module == "__future__"
        if not (is_doc or is_future):
            break
        at = node.end_lineno or at
    return at


def add_missing_imports(code: str) -> ImportRepair:
    """`code` with an import line for each standard-library name it reads and never binds (module doc)."""
    try:
        with warnings.catch_warnings():  # invalid escapes and the like in generated code are not errors
            warnings.simplefilter("ignore")
            tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return ImportRepair(code)  # the sandbox reports what is wrong with it
    bound, read, bare = _bound_and_read(tree)
    free = sorted(read - bound - set(dir(builtins)))
    lines = tuple(line for line in (import_line(n, n in bare) for n in free) if line is not None)
    if not lines:
        return ImportRepair(code)
    rows = code.splitlines(keepends=True)
    at = _insert_at(tree)
    head = "".join(rows[:at])
    if head and not head.endswith("\n"):
        head += "\n"
    return ImportRepair(head + "".join(f"{line}\n" for line in lines) + "".join(rows[at:]), lines)


@dataclass(frozen=True)
class RepeatRepair:
    """What drop_repeated_asserts did: the code, and how many assert statements it removed."""

    code: str
    dropped: int = 0


def drop_repeated_asserts(code: str) -> RepeatRepair:
    """`code` without the module-level assert statements that repeat an earlier one exactly (the same expression and
    message; layout and comments aside): what sample.ground_asserts leaves when a synthesizer wrote several asserts
    of one call with different expected values, and what a small synthesizer writes by itself. Measured on the
    evidence round's answers that passed (git 6e69122): 135 of 195 held a repeated assert, 204 repeats in all.

    Only a statement alone on its lines is removed (not one sharing a line through `;`). A repeat may see other
    state than its first (`assert q.pop() == 1` twice), so the caller runs the result again before using it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return RepeatRepair(code)
    lines = code.splitlines(keepends=True)
    starts: dict[int, int] = {}  # first line -> statements starting there (a `;` puts two on one line)
    for node in tree.body:
        starts[node.lineno] = starts.get(node.lineno, 0) + 1
    seen: set[str] = set()
    drop: list[tuple[int, int]] = []
    for node in tree.body:
        if not isinstance(node, ast.Assert):
            continue
        key = ast.dump(node)  # no line numbers: the same assert anywhere dumps the same
        end = node.end_lineno or node.lineno
        alone = starts[node.lineno] == 1 and all(starts.get(n, 0) == 0 for n in range(node.lineno + 1, end + 1))
        if key in seen and alone:
            drop.append((node.lineno, end))
        seen.add(key)
    if not drop:
        return RepeatRepair(code)
    gone = {n for first, last in drop for n in range(first, last + 1)}
    return RepeatRepair("".join(line for n, line in enumerate(lines, 1) if n not in gone), len(drop))
