"""No function in spectral/, curvops/ or nets/ is longer than 80 lines of code.

A function's length is counted with :mod:`ast` as its physical lines from the
``def`` line to its last line (``end_lineno - lineno + 1``: the signature counts,
decorators do not) minus the lines of its docstring; blank and comment lines inside
the body count.  A nested function counts on its own and inside its enclosing one.
Functions are named ``path::Qualified.name``.

The allowlist is explicit and short, each entry with its reason; an entry that no
longer exists or is no longer too long fails too, so the list only shrinks.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("spectral", "curvops", "nets")
LIMIT = 80

ALLOWED: dict[str, str] = {}


def code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from ``def`` to the end of ``node``, its docstring excluded."""
    assert node.end_lineno is not None
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        assert first.end_lineno is not None
        lines -= first.end_lineno - first.lineno + 1
    return lines


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, int]]:
    """``(qualified name, code lines)`` of every function in ``tree``, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield prefix + node.name, code_lines(node)
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


@functools.cache
def function_lengths() -> dict[str, int]:
    """``path::name -> code lines`` for every function of the three packages."""
    lengths: dict[str, int] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            rel = path.relative_to(ROOT).as_posix()
            for name, lines in _functions(tree):
                lengths[f"{rel}::{name}"] = max(lines, lengths.get(f"{rel}::{name}", 0))
    return lengths


def test_no_function_is_longer_than_the_limit() -> None:
    too_long = {
        name: lines
        for name, lines in function_lengths().items()
        if lines > LIMIT and name not in ALLOWED
    }
    assert not too_long, (
        f"functions over {LIMIT} lines of code (docstring excluded); split them into named "
        f"steps: {dict(sorted(too_long.items(), key=lambda kv: -kv[1]))}"
    )


def test_allowlist_entries_are_still_needed() -> None:
    lengths = function_lengths()
    for name in sorted(ALLOWED):  # (empty today: every function is within the limit)
        assert name in lengths, f"{name} no longer exists: remove it from ALLOWED"
        assert lengths[name] > LIMIT, f"{name} has {lengths[name]} lines: remove it from ALLOWED"


def test_the_count_excludes_the_docstring_and_can_fail() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT - 1))
    source = f'def f():\n    """Doc.\n\n    More doc.\n    """\n{body}\n'
    (node,) = ast.parse(source).body
    assert isinstance(node, ast.FunctionDef)
    assert code_lines(node) == LIMIT  # the def line plus LIMIT - 1 statements
    longer = ast.parse(source + "    return x0\n").body[0]
    assert isinstance(longer, ast.FunctionDef) and code_lines(longer) == LIMIT + 1
    nested = dict(
        _functions(ast.parse("class C:\n    def m(self):\n        def g():\n            pass\n"))
    )
    assert nested == {"C.m": 3, "C.m.g": 2}
