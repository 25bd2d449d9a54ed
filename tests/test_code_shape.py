"""Code-shape budget: few long functions and few functions with many parameters.

A function is *long* when it spans more than 60 lines (``end_lineno - lineno
+ 1``; the ``def`` line starts the count, decorators are not included).  It
has *many parameters* when it takes more than 8 (positional-only, ordinary,
keyword-only, ``*args`` and ``**kwargs`` each count; a leading ``self`` or
``cls`` does not).  Across the library at most 3 functions may be long and at
most 5 may have many parameters.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "advgame_jax"
MAX_LINES = 60
MAX_PARAMS = 8
LONG_BUDGET = 3
MANY_PARAMS_BUDGET = 5


def function_shapes(path: pathlib.Path) -> list[tuple[str, int, int]]:
    """Return ``(name@line, lines, parameters)`` for every function in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    shapes = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        assert node.end_lineno is not None
        lines = node.end_lineno - node.lineno + 1
        args = node.args
        count = (
            len(args.posonlyargs)
            + len(args.args)
            + len(args.kwonlyargs)
            + (args.vararg is not None)
            + (args.kwarg is not None)
        )
        if args.args and args.args[0].arg in ("self", "cls"):
            count -= 1
        shapes.append((f"{node.name}@{node.lineno}", lines, count))
    return shapes


def library_offenders() -> tuple[list[str], list[str]]:
    long, many = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent)
        for where, lines, params in function_shapes(path):
            if lines > MAX_LINES:
                long.append(f"{rel}:{where} ({lines} lines)")
            if params > MAX_PARAMS:
                many.append(f"{rel}:{where} ({params} parameters)")
    return long, many


def test_counter_measures_lines_and_parameters(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    source = (
        "import functools\n"
        "@functools.cache\n"
        f"def long_one():\n{body}\n"
        "def short_one(a, /, b, *c, d, **e):\n    return a\n"
        "class K:\n"
        "    def method(self, a, b, c, d, e, f, g, h):\n        return a\n"
        "    @classmethod\n"
        "    def build(cls, a, b, c, d, e, f, g, h, i):\n        return a\n"
        "async def coro(a, b, c, d, e, f, g, h, *rest):\n    return a\n"
    )
    path = tmp_path / "sample.py"
    path.write_text(source)
    shapes = {name.split("@")[0]: (lines, params) for name, lines, params in function_shapes(path)}
    assert shapes["long_one"] == (61, 0)  # decorator line not counted
    assert shapes["short_one"] == (2, 5)
    assert shapes["method"] == (2, 8)  # self excluded
    assert shapes["build"] == (2, 9)  # cls excluded
    assert shapes["coro"] == (2, 9)  # *rest counts


def test_library_within_code_shape_budget():
    long, many = library_offenders()
    problems = []
    if len(long) > LONG_BUDGET:
        problems.append(
            f"{len(long)} functions over {MAX_LINES} lines (at most {LONG_BUDGET}):\n  "
            + "\n  ".join(long)
        )
    if len(many) > MANY_PARAMS_BUDGET:
        problems.append(
            f"{len(many)} functions with over {MAX_PARAMS} parameters "
            f"(at most {MANY_PARAMS_BUDGET}):\n  " + "\n  ".join(many)
        )
    assert not problems, "\n".join(problems)
