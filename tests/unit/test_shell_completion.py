"""Shell completion as docs/operations.md documents it (click's _IOTDLM_COMPLETE), through the
real root group: the script it prints for each shell, and completions of lazily loaded groups."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import iotdlm

OPERATIONS = Path(iotdlm.__file__).resolve().parent.parent.parent / "docs" / "operations.md"

#: the installed `iotdlm` script calls iotdlm.cli.main:main; click names the variable after the program
_ENTRY = "from iotdlm.cli.main import main; main(prog_name='iotdlm')"


def _complete(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _ENTRY], capture_output=True, text=True, env={**os.environ, **env}, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_the_documented_source_commands_print_a_script(shell: str) -> None:
    assert f"_IOTDLM_COMPLETE={shell}_source iotdlm" in OPERATIONS.read_text(encoding="utf-8")
    script = _complete({"_IOTDLM_COMPLETE": f"{shell}_source"})
    assert "_IOTDLM_COMPLETE" in script
    assert f"{shell}_complete" in script


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("iotdlm tra", "transfer"),
        ("iotdlm transfer in", "init"),
        ("iotdlm transfer init --pro", "--provider-id"),
        ("iotdlm sm setup --dir", "--direct"),
        ("iotdlm --log-format j", "json"),
    ],
)
def test_completions_reach_into_lazy_groups(words: str, expected: str) -> None:
    cword = str(len(words.split()) - 1)
    out = _complete({"_IOTDLM_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": cword})
    assert f"plain,{expected}" in out.splitlines()
