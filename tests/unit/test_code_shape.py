"""Issue 12's shape limits for src/iotdlm: no source file over 700 lines, no function or method
over 80 lines (counted from the ``def`` line to the last line of its body)."""

from __future__ import annotations

import ast
import pathlib

import pytest

import iotdlm

MAX_FILE_LINES = 700
MAX_FUNCTION_LINES = 80
SRC = pathlib.Path(iotdlm.__file__).resolve().parent


def file_offences(name: str, source: str) -> list[str]:
    """What in one source file breaks the limits, one line of text each."""
    found: list[str] = []
    lines = len(source.splitlines())
    if lines > MAX_FILE_LINES:
        found.append(f"{name}: {lines} lines (limit {MAX_FILE_LINES})")
    for node in ast.walk(ast.parse(source, filename=name)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(
                    f"{name}:{node.lineno}: function {node.name} is {length} lines (limit {MAX_FUNCTION_LINES})"
                )
    return found


def tree_offences(root: pathlib.Path) -> list[str]:
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        found.extend(file_offences(str(path.relative_to(root.parent)), path.read_text(encoding="utf-8")))
    return found


def _function(name: str, body_lines: int) -> str:
    return f"def {name}() -> None:\n" + "    x = 1\n" * (body_lines - 1) + "\n"


@pytest.mark.parametrize(
    ("source", "expect"),
    [
        (_function("short", MAX_FUNCTION_LINES), []),
        (_function("long", MAX_FUNCTION_LINES + 1), ["function long is 81 lines"]),
        (
            "class C:\n    " + _function("method", MAX_FUNCTION_LINES + 5).replace("\n", "\n    "),
            ["function method is 85 lines"],
        ),
        ("async " + _function("coro", MAX_FUNCTION_LINES + 1), ["function coro is 81 lines"]),
        ("x = 1\n" * (MAX_FILE_LINES + 1), ["701 lines (limit 700)"]),
        ("x = 1\n" * MAX_FILE_LINES, []),
    ],
    ids=["80-line-function", "81-line-function", "long-method", "long-coroutine", "701-line-file", "700-line-file"],
)
def test_the_checker_finds_what_is_too_long(source: str, expect: list[str]) -> None:
    found = file_offences("m.py", source)
    assert len(found) == len(expect)
    for text, fragment in zip(found, expect, strict=True):
        assert fragment in text


def test_no_source_file_or_function_is_too_long() -> None:
    found = tree_offences(SRC)
    print("\n".join(found))
    assert not found, "too long:\n" + "\n".join(found)
