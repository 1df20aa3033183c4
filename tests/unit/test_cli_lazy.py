"""The command line loads lazily: ``iotdlm --help`` imports no heavy package, lists every command
group with the same help as if they were all loaded, and every command's ``--help`` still works."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from iotdlm.cli.lazy import Lazy, LazyGroup
from iotdlm.cli.main import COMMANDS, main

HEAVY = ("cryptography", "sqlalchemy", "alembic", "nats", "aiohttp", "rich", "iotdlm.km", "iotdlm.store")

_PROBE = """
import json, sys
from iotdlm.cli.main import main
try:
    main(sys.argv[1:], prog_name="iotdlm")
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _imported_by(*argv: str) -> tuple[int, set[str], str]:
    """Run the CLI with ``argv`` in a fresh interpreter: exit code, modules it imported, output."""
    out = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, check=True).stdout
    head, _, last = out.rstrip("\n").rpartition("\n")
    result = json.loads(last)
    return result["code"], set(result["modules"]), head


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.mark.parametrize("argv", [("--help",), ("--version",)], ids=["help", "version"])
def test_root_imports_no_heavy_package(argv: tuple[str, ...]) -> None:
    code, modules, output = _imported_by(*argv)
    assert code == 0, output
    assert _heavy(modules) == []
    assert not any(m.startswith("iotdlm.cli.") and m not in ("iotdlm.cli.main", "iotdlm.cli.lazy") for m in modules)
    if argv == ("--help",):
        for name in COMMANDS:
            assert f"\n  {name} " in output


def test_a_group_loads_its_own_module_only() -> None:
    code, modules, output = _imported_by("device", "--help")
    assert code == 0, output
    assert "iotdlm.cli.device" in modules
    assert not {"iotdlm.cli.ca", "iotdlm.cli.pm", "iotdlm.cli.demo", "iotdlm.cli.cm"} & modules


def _loaded_group() -> click.Group:
    """The root group as it would be with every command imported eagerly."""
    eager = click.Group(
        "main", callback=main.callback, params=main.params, help=main.help, context_settings=main.context_settings
    )
    assert isinstance(main, LazyGroup)
    for name in COMMANDS:
        eager.add_command(main.load(name), name)
    return eager


@pytest.mark.parametrize("width", [60, 80, 100, 200])
def test_listed_help_is_the_commands_own(width: int) -> None:
    """The help kept in the table is what the loaded commands would show, at any terminal width."""
    lazy = CliRunner().invoke(main, ["--help"], terminal_width=width)
    eager = CliRunner().invoke(_loaded_group(), ["--help"], terminal_width=width)
    assert lazy.exit_code == eager.exit_code == 0
    assert lazy.output == eager.output


def _command_paths(group: click.Group, ctx: click.Context, prefix: tuple[str, ...]) -> list[tuple[str, ...]]:
    paths = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, (*prefix, name)
        paths.append((*prefix, name))
        if isinstance(command, click.Group):
            paths.extend(_command_paths(command, ctx, (*prefix, name)))
    return paths


def test_every_command_has_working_help() -> None:
    paths = _command_paths(main, click.Context(main), ())
    assert {p[0] for p in paths} == set(COMMANDS)
    assert len(paths) > 2 * len(COMMANDS)  # the groups' own commands are walked too
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(main, [*path, "--help"], prog_name="iotdlm")
        assert result.exit_code == 0, (path, result.output)
        assert f"Usage: iotdlm {' '.join(path)}" in result.output, path


def test_a_wrong_table_entry_is_a_programming_error() -> None:
    group = LazyGroup("g", lazy_subcommands={"x": Lazy("iotdlm.cli.lazy:Lazy", "not a command")})
    result = CliRunner().invoke(group, ["x"])
    assert isinstance(result.exception, TypeError)
    assert "iotdlm.cli.lazy:Lazy is not a click command" in str(result.exception)


def test_a_km_worker_loads_no_asn1_module_set_until_a_request_needs_it() -> None:
    """Issue 15 (start-up): every km worker, cm and pm imports the km core and the certificate
    profiles; pyasn1-modules' CRMF/CMP/CMS/RFC 4108 modules (~0.35 s) load only at the first CRMF
    request, serverkeygen or hardwareModuleName parse -- and then do their work."""
    code = (
        "import sys\n"
        "from iotdlm.cli import km\n"
        "import iotdlm.km.service, iotdlm.pki.profiles\n"
        "before = sorted(m for m in sys.modules if m.startswith(('pyasn1_modules', 'alembic')))\n"
        "from iotdlm.pki.names import HARDWARE_MODULE_NAME, hardware_module_name, parse_hardware_module_name\n"
        "from cryptography.x509 import ObjectIdentifier\n"
        "name = hardware_module_name(ObjectIdentifier('1.3.6.1.4.1.99999.1'), b'SN-1')\n"
        "assert name.type_id == HARDWARE_MODULE_NAME\n"
        "assert parse_hardware_module_name(name.value) == (ObjectIdentifier('1.3.6.1.4.1.99999.1'), b'SN-1')\n"
        "from pyasn1_modules import rfc4108\n"
        "assert HARDWARE_MODULE_NAME.dotted_string == str(rfc4108.id_on_hardwareModuleName)\n"
        "print(before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
