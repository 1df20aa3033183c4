"""docs/architecture.md shows the layers import-linter keeps: its layer block and the layers
contract in pyproject.toml name the same layers in the same order."""

from __future__ import annotations

import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def contract_layers() -> list[str]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    contracts = cfg["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c["type"] == "layers"]
    return [" ".join(layer.split()) for layer in layers]


def doc_layers() -> list[str]:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text[text.index("## The layers") :]
    block = section[section.index("```\n") + 4 : section.index("\n```", section.index("```\n") + 4)]
    # each line is a layer, then optionally two or more spaces and a remark in parentheses
    return [" ".join(re.split(r"\s{2,}\(", line)[0].split()) for line in block.splitlines() if line.strip()]


def test_the_architecture_page_shows_the_layers_the_contract_keeps() -> None:
    assert doc_layers() == contract_layers()
