"""`iotdlm demo` end to end, as a user runs it: a real process tree (NATS server, km process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.nats
def test_demo_runs_and_issues_verified_certificates(tmp_path: Path) -> None:
    data = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "iotdlm.cli.main", "demo", "--data", str(data), "--devices", "4"],
        capture_output=True, text=True, timeout=180, check=False, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("verified") == 4
    assert "cm asks for a device certificate: refused" in out.stdout
    assert "pm asks for a service certificate: refused" in out.stdout
    # the deployment was kept: the CLI reads what the demo recorded
    listed = subprocess.run(
        [sys.executable, "-m", "iotdlm.cli.main", "ca", "list", "--data", str(data), "--profile", "factory"],
        capture_output=True, text=True, timeout=60, check=False, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert listed.returncode == 0, listed.stderr
    assert "2 of 2 shown" in listed.stdout
