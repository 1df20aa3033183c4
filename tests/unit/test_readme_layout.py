"""Issue 12: the README's Layout section matches the tree. Every package and top-level module of
src/iotdlm is named there, and everything named there exists."""

from __future__ import annotations

import pathlib
import re

import iotdlm

SRC = pathlib.Path(iotdlm.__file__).resolve().parent
README = SRC.parent.parent / "README.md"


def layout_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Layout") :]
    return section[section.index("```") + 3 : section.index("```", section.index("```") + 3)]


def in_tree() -> set[str]:
    names = {p.name + "/" for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    names |= {p.name for p in SRC.glob("*.py") if p.name != "__init__.py"}
    return names


def named(block: str) -> set[str]:
    """The names of the entries under src/iotdlm/: each entry line is indented two spaces and
    starts with one or more names (``pki/``, ``errors.py``) before its description."""
    body = block[block.index("src/iotdlm/") + len("src/iotdlm/") : block.index("\ntests/")]
    found: set[str] = set()
    for line in body.splitlines():
        if not re.match(r"  \S", line):
            continue  # a description's continuation
        for word in line.split():
            if not word.endswith((".py", "/")):
                break
            found.add(word)
    return found


def test_the_layout_parser_reads_entries_not_descriptions() -> None:
    block = "src/iotdlm/\n  a.py b.py   words, x.py inside\n                more/ words\n  pkg/   text\ntests/   t\n"
    assert named(block) == {"a.py", "b.py", "pkg/"}


def test_every_package_and_module_is_in_the_readme_layout() -> None:
    missing = in_tree() - named(layout_block())
    assert not missing, f"README Layout does not name: {sorted(missing)}"


def test_everything_the_readme_layout_names_exists() -> None:
    stale = named(layout_block()) - in_tree()
    assert not stale, f"README Layout names what is not in src/iotdlm: {sorted(stale)}"
