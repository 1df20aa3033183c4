"""Issue 14, stumble 13: the docs say what the tree and a fresh deployment hold. The README's
layout names every folder under tests/ (and no other); docs/operations.md's file table names every
folder `iotdlm init` creates, every module identity among them; `pm bench make` and the demo name
devices alike."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
from pathlib import Path

import iotdlm
from iotdlm.deployment import init_deployment
from iotdlm.device.simulated import bench_device_id
from iotdlm.pki.keys import Algorithm

REPO = Path(iotdlm.__file__).resolve().parent.parent.parent
README = REPO / "README.md"
OPERATIONS = REPO / "docs" / "operations.md"


def _readme_tests_line() -> str:
    text = README.read_text(encoding="utf-8")
    layout = text[text.index("## Layout") :]
    block = layout[layout.index("\ntests/") + 1 :]
    return block[: block.index("\nbench/")]


def test_the_readme_layout_names_exactly_the_test_folders() -> None:
    named = set(re.findall(r"\b([a-z_]+)/", _readme_tests_line())) - {"tests"}
    on_disk = {p.name for p in (REPO / "tests").iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    assert named == on_disk
    for folder in on_disk:  # and none of them is an empty promise
        assert any((REPO / "tests" / folder).iterdir()), folder


def _file_table() -> str:
    text = OPERATIONS.read_text(encoding="utf-8")
    start = text.index("| path | what | protect it |")
    return text[start : text.index("\n\n", start)]


def test_the_operations_file_table_names_what_init_creates(tmp_path: Path) -> None:
    dep, _ = init_deployment(
        tmp_path / "site",
        organization="Docs",
        algorithm=Algorithm.P256,
        dtypes=["boardA"],
        passphrase=b"pw",
        now=dt.datetime.now(dt.UTC),
    )
    table = _file_table()
    for entry in sorted(dep.root.iterdir()):
        assert f"`{entry.name}" in table, f"docs/operations.md's file table does not name {entry.name}"
    modules = {p.name for p in (dep.root / "modules").iterdir()}
    assert modules >= {"km", "sm", "cm", "admin", "modes", "pm-boardA"}
    for name in modules - {"pm-boardA"}:
        assert re.search(rf"\b{name}\b", table), f"the file table does not name modules/{name}/"
    assert "modules/modes/" in table
    assert "pm-&lt;dtype&gt;" in table


def test_pm_bench_make_gives_the_ids_the_demo_uses(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "iotdlm.cli.main", "pm", "bench", "make", "--dir", str(tmp_path), "--dtype", "boardA",
         "--count", "2"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [bench_device_id("boardA", 1), bench_device_id("boardA", 2)]
    demo = (REPO / "src" / "iotdlm" / "cli" / "demo.py").read_text(encoding="utf-8")
    assert "bench_device_id(DTYPE, i)" in demo
    assert "range(1, devices + 1)" in demo


def _transfer_rows() -> dict[str, str]:
    text = OPERATIONS.read_text(encoding="utf-8")
    start = text.index("| command | who | options |")
    rows = {}
    for line in text[start : text.index("\n\n", start)].splitlines()[2:]:
        m = re.match(r"\| `transfer ([a-z-]+)` \|", line)
        assert m, line
        rows[m.group(1)] = line
    return rows


def test_every_transfer_option_is_documented_with_its_role() -> None:
    """Stumble 8: `transfer init` needs --provider-id, which the docs did not show."""
    import click

    from iotdlm.cli.transfer import transfer

    rows = _transfer_rows()
    ctx = click.Context(transfer)
    assert set(rows) == set(transfer.list_commands(ctx))
    for name, row in rows.items():
        command = transfer.get_command(ctx, name)
        assert command is not None
        for param in command.params:
            if isinstance(param, click.Option) and param.name not in ("data", "help"):
                assert f"`{param.opts[0]}" in row, f"docs/operations.md: transfer {name} does not name {param.opts[0]}"
    assert "`--provider-id NAME` (required" in rows["init"]
    examples = OPERATIONS.read_text(encoding="utf-8")
    for line in examples.splitlines():
        if line.startswith("iotdlm transfer init "):
            assert "--provider-id" in line, line
