"""The engine stays readable: no function in ``linnaeus/engine`` is longer than 60 lines (decorators and docstring
included), so one training step or one component can be read on a screen."""

from __future__ import annotations

import ast
from pathlib import Path

import linnaeus

ENGINE = Path(linnaeus.__file__).parent / "engine"
MAX_LINES = 60


def long_functions(source: str, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function or method in ``source`` longer than ``limit`` lines."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            lines = node.end_lineno - first + 1
            if lines > limit:
                found.append((node.name, lines))
    return found


def test_the_walker_finds_a_long_function() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    assert long_functions(f"@decorated\ndef f():\n{body}\n") == [("f", MAX_LINES + 2)]
    assert long_functions("def g():\n    return 1\n") == []


def test_every_engine_function_is_at_most_60_lines() -> None:
    files = sorted(ENGINE.rglob("*.py"))
    assert len(files) > 10  # the walk really looks at the engine
    too_long = [
        f"{path.relative_to(ENGINE)}::{name} ({lines} lines)"
        for path in files
        for name, lines in long_functions(path.read_text())
    ]
    assert not too_long, f"functions over {MAX_LINES} lines: " + ", ".join(too_long)
