"""docs/configuration.md is generated from the configuration schemas (issue 14): it fails here the
day a schema gains, loses or changes a key and the page is not generated again, and every key says
what it is for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

import iotdlm
from iotdlm.cli.config import FILES, _load, field_comments, reference, rows, type_name
from iotdlm.cm.config import CmFile
from iotdlm.deployment import DeploymentConfig

DOC = Path(iotdlm.__file__).resolve().parent.parent.parent / "docs" / "configuration.md"


def _iotdlm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iotdlm.cli.main", *args], capture_output=True, text=True, env=os.environ, check=False
    )


def test_the_page_is_what_the_schemas_generate() -> None:
    assert DOC.read_text(encoding="utf-8") == reference(), "run `iotdlm config reference --out docs/configuration.md`"


def test_check_through_the_entry_point(tmp_path: Path) -> None:
    done = _iotdlm("config", "reference", "--check", str(DOC))
    assert done.returncode == 0, done.stderr
    stale = tmp_path / "configuration.md"
    stale.write_text(DOC.read_text(encoding="utf-8").replace("| `crl_partitions` |", "| `crl_parts` |"))
    done = _iotdlm("config", "reference", "--check", str(stale))
    assert done.returncode == 1
    assert "iotdlm config reference --out" in done.stderr
    assert "Traceback" not in done.stderr
    done = _iotdlm("config", "reference", "--out", str(tmp_path / "no" / "such" / "dir.md"))
    assert done.returncode == 1
    assert "cannot write" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("section", [s for f in FILES for s in f.sections], ids=lambda s: s.target)
def test_every_key_is_on_the_page_and_described(section: object) -> None:
    cls = _load(section.target)  # type: ignore[attr-defined]
    text = reference()
    for row in rows(cls):
        assert row.description, f"{cls.__name__}.{row.key}: add a `#:` comment above it (or to DESCRIPTIONS)"
        assert f"| `{row.key}` | {row.type.replace('|', chr(92) + '|')} |" in text


def test_every_toml_schema_in_the_source_is_in_the_reference() -> None:
    """A configuration file read with msgspec.toml.decode(..., type=X) elsewhere: X must be listed."""
    src = Path(iotdlm.__file__).resolve().parent
    listed = {s.target.split(":")[1] for f in FILES for s in f.sections}
    for path in src.rglob("*.py"):
        for part in path.read_text(encoding="utf-8").split("msgspec.toml.decode(")[1:]:
            name = part.split("type=")[1].split(")")[0]
            assert name in listed, f"{path.name} reads a TOML file as {name}: add it to iotdlm.cli.config.FILES"


def test_rows_follow_the_schema() -> None:
    class Toy(msgspec.Struct):
        #: the first
        #: two lines
        a: int
        b: str | None = None  # trailing words
        c: list[str] = msgspec.field(default_factory=lambda: ["x"])
        d: bool = True

    assert field_comments(Toy) == {"a": "the first two lines", "b": "trailing words", "c": "", "d": ""}
    got = [(r.key, r.type, r.default) for r in rows(Toy)]
    assert got == [
        ("a", "integer", "required"),
        ("b", "string (optional)", "not set"),
        ("c", "list of string", '["x"]'),
        ("d", "boolean", "true"),
    ]


def test_known_keys_and_defaults() -> None:
    text = reference()
    assert "| `crl_partitions` | integer | 64 |" in text
    assert "| `allow_origins` | list of string | [] |" in text
    assert "### `[limits]`" in text
    assert "| `idle_timeout` | number | 15.0 |" in text
    assert type_name(dict[str, float]) == "table of number"
    assert {f.name for f in msgspec.structs.fields(CmFile)} <= {r.key for r in rows(CmFile)}
    assert len(rows(DeploymentConfig)) == len(msgspec.structs.fields(DeploymentConfig))
