"""`iotdlm demo` end to end, as a user runs it: a real process tree under the modes supervisor
(NATS, km, sm, pm, cm), a vendor repository, simulated devices, EST and OCSP over HTTP, then the
fleet's trust transfer to a second deployment (its own NATS, km, cm) over the network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


# real_clock: the demo verifies cm's TLS certificates with OpenSSL, at the machine's clock; its
# processes get no IOTDLM_CLOCK_OFFSET (env below), so make test-future would only repeat this run
@pytest.mark.nats
@pytest.mark.real_clock
def test_demo_runs_the_lifecycle(tmp_path: Path) -> None:
    data = tmp_path / "site"
    env = {"COLUMNS": "200", "PATH": "/usr/bin:/bin"}
    if os.environ.get("PYTHONPATH"):  # a worktree's sources, as the suite runs them
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    out = subprocess.run(
        [sys.executable, "-m", "iotdlm.cli.main", "demo", "--data", str(data), "--devices", "5"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "3. sm stored polarfire-soc release 7" in text
    assert "4. software flashed into 5 devices" in text
    assert text.count("complete") == 5
    assert "CSR made on the device" in text
    assert "CRMF raVerified by pm" in text
    assert "a cm-signed request for a device certificate: refused" in text
    assert "OCSP over HTTP through cm: good" in text
    assert "OCSP through cm at once: revoked" in text
    assert "audit log:" in text
    assert "intact" in text
    # 8. the trust transfer over the network: devices 00001, 00003, 00005 (the ids `pm bench make`
    # gives) make CSRs and are handed over;
    # 00005 runs other firmware and falls back; the other two move to CA2 with new keys
    assert "SP1's root and factory CA registered" in text
    assert "2 device(s) cannot make a CSR" in text
    assert "SP1 exported 3 device(s)" in text
    assert "SP1 delivered 3 per-device message(s) at its cm" in text
    assert (
        "2 device(s) attested at SP2 and re-enrolled with CA2 (2 with a new key pair, FR3; 2 with SP2's release 8 "
        "installed first)" in text
    )
    assert (
        "polarfire-soc-00005 runs other firmware: attestation at SP2 failed and it fell back to SP1 "
        "(still on its CA1 certificate)" in text
    )
    assert "the measured firmware differs from the reference agreed with SP1" in text
    assert "fell back too" not in text
    assert "SP1: 2 device(s) revoked-at-CA1" in text
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if "at SP1 (CA1)" in line)
    table = lines[head - 2 : head + 6]  # the title, the box and its header, three rows, the bottom
    rows = {line.split()[1]: line for line in table if line.startswith("│ polarfire-soc-0000")}
    assert set(rows) >= {"polarfire-soc-00001", "polarfire-soc-00003", "polarfire-soc-00005"}, text
    for moved in ("polarfire-soc-00001", "polarfire-soc-00003"):
        assert "revoked-at-CA1" in rows[moved]
        assert "enrolled" in rows[moved]
    assert rows["polarfire-soc-00005"].count("failed-fallback") == 2
    assert table[-1].startswith("└"), table
    assert max(len(line) for line in table) <= 80  # the transfer's table fits 80 columns
    assert (
        "8. trust transfer over the network: 2 of 3 device(s) enrolled with CA2 (new keys), 2 revoked-at-CA1, "
        "1 failed-fallback (back with SP1)" in text
    )
    # iotdlm is not on this PATH (as after `make demo` in a fresh shell): the last lines say how to get it
    # (after the last step; a log line of the teardown, such as a client's warning once km has
    # stopped, may come after it, so not only the last words are read)
    hint = " ".join(text[text.index("8. trust transfer over the network:") :].split())
    assert "`iotdlm` is not on your PATH" in hint
    assert "pipx install ." in hint
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
    assert "5 of 5 shown" in listed.stdout
    for folder, expected in ((data, "revoked-at-CA1"), (data / "sp2", "enrolled")):
        status = subprocess.run(
            [sys.executable, "-m", "iotdlm.cli.main", "transfer", "status", "--data", str(folder), "--devices"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert expected in status.stdout
        assert "failed-fallback" in status.stdout
    # `iotdlm up` and the console open the kept deployment at once: the CA passphrase is where `up`
    # (and the console, for its HTTPS certificate) look for it, without $IOTDLM_CA_PASSPHRASE
    from iotdlm.deployment import PASSPHRASE_ENV, Deployment

    assert PASSPHRASE_ENV not in env
    Deployment.load(data).load_cas()  # decrypts the CA keys with DIR/secrets/ca-passphrase
    assert f"iotdlm up --data {data}" in " ".join(text.split())
    url = subprocess.run(
        [sys.executable, "-m", "iotdlm.cli.main", "console", "url", "--data", str(data), "--json"],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert url.returncode == 0, url.stderr
    assert '"url": "https://127.0.0.1:8444/"' in url.stdout
