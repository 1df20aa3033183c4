"""JSON log lines as an option (issue 14): `iotdlm --log-format json` or IOTDLM_LOG_FORMAT=json, one
JSON object a line, passed on to the services `iotdlm up` starts through the environment."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from iotdlm.cli.logformat import LOG_FORMAT_ENV, JsonFormatter, chosen, formatter


def _record(message: str, *, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("iotdlm.test", logging.WARNING, __file__, 1, "%s", (message,), exc_info)


@given(st.text())
def test_every_message_is_one_json_line(message: str) -> None:
    line = JsonFormatter().format(_record(message))
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == message
    assert (parsed["level"], parsed["logger"]) == ("WARNING", "iotdlm.test")
    assert parsed["time"].endswith("Z")


def test_an_exception_travels_in_its_own_field() -> None:
    parsed = json.loads(JsonFormatter().format(_record("failed", exc=True)))
    assert "ValueError: boom" in parsed["exception"]


def test_the_environment_picks_the_format(monkeypatch: object) -> None:
    import pytest

    mp = pytest.MonkeyPatch()
    try:
        mp.setenv(LOG_FORMAT_ENV, "JSON")
        assert chosen() == "json"
        assert isinstance(formatter(), JsonFormatter)
        mp.setenv(LOG_FORMAT_ENV, "yaml")
        assert chosen() == "text"
        assert not isinstance(formatter(), JsonFormatter)
    finally:
        mp.undo()


_PROBE = """
import logging, os, sys
from iotdlm.cli.main import main
import click

@main.command("probe")
def probe():
    logging.getLogger("iotdlm.probe").warning("hello %s", "world")
    print("child sees", os.environ.get("IOTDLM_LOG_FORMAT"))

main(sys.argv[1:], prog_name="iotdlm")
"""


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def test_the_root_option_and_the_variable_through_the_entry_point() -> None:
    for argv, env in ((("--log-format", "json", "probe"), {}), (("probe",), {LOG_FORMAT_ENV: "json"})):
        done = _run(*argv, env=env)
        assert done.returncode == 0, done.stderr
        (line,) = done.stderr.splitlines()
        parsed = json.loads(line)
        assert (parsed["logger"], parsed["message"]) == ("iotdlm.probe", "hello world")
        assert "child sees json" in done.stdout  # what `up` passes on to the services it starts
    done = _run("probe", env={LOG_FORMAT_ENV: ""})
    assert "iotdlm.probe WARNING hello world" in done.stderr
    done = _run("--log-format", "yaml", "probe")
    assert done.returncode == 2
    assert "'yaml' is not one of 'text', 'json'" in done.stderr


def test_help_shows_the_option(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "iotdlm.cli.main", "--help"], capture_output=True, text=True)
    assert "--log-format [text|json]" in done.stdout
    assert "IOTDLM_LOG_FORMAT" in done.stdout
