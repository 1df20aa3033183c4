"""Every ``--help`` speaks the operator's words (issue 14, stumble 12): no references into the papers
("Table 1", "Algorithm 1", "Figs 3-5", "seed 003"), no field names of their formulas (``sig_sm``,
``dtype``, CA-URI, x5bag); the docs keep those. One test walks every command's help page in this
process; one runs the real entry point for the pages the issue quoted."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from iotdlm.cli.main import COMMANDS, main

#: (pattern, what to say instead) -- case-sensitive where the word is a code name
BANNED: tuple[tuple[str, str], ...] = (
    (r"Table\s*1\b", "the operation modes"),
    (r"\bAlgorithm\s*\d", "say what the step does"),
    (r"\bFigs?\.?\s*\d", "say what the step does"),
    (r"\bseed\s*\d", "the trust transfer"),
    (r"\bsig_sm\b", "sm's signature"),
    (r"(?<![-{])\bdtypes?\b(?![-}])", "device type"),  # the --dtype flag and {dtype} placeholders stay
    (r"\bCA-URI\b", "cm's EST URL"),
    (r"\bx5bag\b", "the factory certificates"),
    (r"\(later\)", "what it does now"),
    (r"paper", "what it does"),
)


def _walk(command: click.Command, path: tuple[str, ...]) -> list[tuple[str, ...]]:
    out = [path]
    if isinstance(command, click.Group):
        ctx = click.Context(command, info_name=path[-1])
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None, f"{' '.join(path)} {name} does not load"
            out.extend(_walk(sub, (*path, name)))
    return out


def _all_commands() -> list[tuple[str, ...]]:
    return [p[1:] for p in _walk(main, ("iotdlm",))]


def _offences(text: str) -> list[str]:
    found = []
    for pattern, instead in BANNED:
        for m in re.finditer(pattern, text):
            line = next(ln for ln in text.splitlines() if m.group(0) in ln)
            found.append(f"{m.group(0)!r} (say: {instead}) in: {line.strip()}")
    return found


def test_the_walk_reaches_every_group_and_their_commands() -> None:
    commands = _all_commands()
    groups = {c[0] for c in commands if c}
    assert set(COMMANDS) <= groups
    assert ("transfer", "init") in commands
    assert ("sm", "setup") in commands
    assert len(commands) > 60


@pytest.mark.parametrize("argv", _all_commands(), ids=lambda a: " ".join(a) or "iotdlm")
def test_help_uses_the_operators_words(argv: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*argv, "--help"], prog_name="iotdlm", terminal_width=200)
    assert result.exit_code == 0, result.output
    assert _offences(result.output) == []


@pytest.mark.parametrize("pattern", [p for p, _ in BANNED])
def test_the_checker_catches_each_word(pattern: str) -> None:
    samples = {
        r"Table\s*1\b": "the paper's Table 1",
        r"\bAlgorithm\s*\d": "runs Algorithm 2",
        r"\bFigs?\.?\s*\d": "(Figs 3-5)",
        r"\bseed\s*\d": "(seed 003)",
        r"\bsig_sm\b": "store with sig_sm",
        r"(?<![-{])\bdtypes?\b(?![-}])": "one pm per dtype",
        r"\bCA-URI\b": "the device's CA-URI",
        r"\bx5bag\b": "register (x5bag)",
        r"\(later\)": "and (later) validation",
        r"paper": "as in the paper",
    }
    assert _offences(samples[pattern]) != []
    assert _offences("the device type and sm's signature") == []


def _entry_point_help(*argv: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "iotdlm.cli.main", *argv, "--help"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_transfer_help_names_the_roles_the_right_way_round() -> None:
    text = _entry_point_help("transfer")
    assert _offences(text) == []
    # the provider handing its fleet over is SP1; the one taking it over is SP2
    flat = " ".join(text.split())
    assert re.search(r"hand your fleet over to a new provider \(you are SP1\)", flat), text
    assert re.search(r"take one over \(you are SP2\)", flat), text


@pytest.mark.parametrize("argv", [(), ("km",), ("pm",), ("sm",), ("up",), ("mode",), ("fleet", "run")])
def test_the_pages_the_issue_quoted(argv: tuple[str, ...]) -> None:
    assert _offences(_entry_point_help(*argv)) == []
