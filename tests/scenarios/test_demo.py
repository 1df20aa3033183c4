"""`iotdlm demo` end to end, as a user runs it: a real process tree under the modes supervisor
(NATS, km, sm, pm, cm), a vendor repository, simulated devices, EST and OCSP over HTTP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.nats
def test_demo_runs_the_lifecycle(tmp_path: Path) -> None:
    data = tmp_path / "site"
    env = {"COLUMNS": "200", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "iotdlm.cli.main", "demo", "--data", str(data), "--devices", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "3. sm stored polarfire-soc release 7" in text
    assert "4. software flashed into 4 devices" in text
    assert text.count("complete") == 4
    assert "CSR made on the device" in text
    assert "CRMF raVerified by pm" in text
    assert "a cm-signed request for a device certificate: refused" in text
    assert "OCSP over HTTP through cm: good" in text
    assert "OCSP through cm at once: revoked" in text
    assert "audit log:" in text
    assert "intact" in text
    # the deployment was kept: the CLI reads what the demo recorded
    listed = subprocess.run(
        [sys.executable, "-m", "iotdlm.cli.main", "ca", "list", "--data", str(data), "--profile", "factory"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert listed.returncode == 0, listed.stderr
    assert "4 of 4 shown" in listed.stdout
