"""``iotdlm transfer status`` and ``export --out`` as the operator meets them (issue 14): the
status readable at 80 columns when piped, its two "updated" columns told apart, --json with stable
keys; an --out that cannot be written refused before a transfer is made, and a write that fails
after it leaves no orphan (the UpdateInfoList is kept in the data folder, and says where)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from iotdlm.cli.main import main
from iotdlm.deployment import PASSPHRASE_ENV
from iotdlm.transfer import messages as m
from iotdlm.transfer import status as st
from tests.unit.test_transfer_cli import PW, _deployment, _factory_and_operational

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def iotdlm(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "80"}
    return subprocess.run(
        [sys.executable, "-m", "iotdlm.cli.main", *args], capture_output=True, text=True, env=env, check=False
    )


def test_transfer_export_out_and_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, PW)
    sp1, sp2 = _deployment(tmp_path / "sp1", "SP1"), _deployment(tmp_path / "sp2", "SP2")
    for d in ("sensor-00001", "sensor-00002"):
        _factory_and_operational(sp1, d)
    runner = CliRunner()
    for dep, who in ((sp1, "sp1"), (sp2, "sp2")):
        r = runner.invoke(main, ["transfer", "init", "--data", str(dep.root), "--provider-id", who])
        assert r.exit_code == 0, r.output
    sp2_cert = sp2.root / "transfer" / "identity" / "certificate.pem"
    export = ["transfer", "export", "--data", str(sp1.root), "--peer-id", "sp2", "--peer-cert", str(sp2_cert),
              "--device", "sensor-00001", "--device", "sensor-00002"]  # fmt: skip

    # an --out in a folder that does not exist: refused before any transfer is made
    r = iotdlm(*export, "--out", str(tmp_path / "no" / "such" / "uil.jws"))
    assert r.returncode == 4, r.stdout + r.stderr
    assert "does not exist" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    r = iotdlm("transfer", "status", "--data", str(sp1.root))
    assert r.returncode == 4
    assert "no transfer here" in r.stderr

    # the disk fills after the transfer is made: the UpdateInfoList is kept, and the message says where
    out = tmp_path / "uil.jws"
    real = Path.write_bytes

    def disk_full(self: Path, raw: bytes) -> int:  # type: ignore[override]
        if self == out:
            raise OSError(28, "No space left on device")
        return real(self, raw)

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    r = runner.invoke(main, [*export, "--out", str(out)])
    monkeypatch.undo()
    monkeypatch.setenv(PASSPHRASE_ENV, PW)
    assert r.exit_code == 1, r.output
    (kept,) = (sp1.root / "transfer" / "exports").iterdir()
    tid = m.transfer_id(m.sha256(kept.read_bytes()))
    flat = " ".join(r.output.split())
    assert f"transfer {tid} was made, but writing {out} failed" in flat
    assert str(kept) in r.output
    # and it is the real thing: SP2 accepts it
    sp1_cert = sp1.root / "transfer" / "identity" / "certificate.pem"
    cas = ["--cert", str(sp1.root / "ca" / "root.pem"), "--cert", str(sp1.root / "ca" / "factory.pem")]
    r = runner.invoke(main, ["transfer", "register-ca", "--data", str(sp2.root), *cas])
    assert r.exit_code == 0, r.output
    accept = ["transfer", "accept", "--data", str(sp2.root), "--in", str(kept), "--peer-id", "sp1",
              "--peer-cert", str(sp1_cert)]  # fmt: skip
    r = runner.invoke(main, [*accept, "--out", str(tmp_path / "no" / "tm.cwt")])  # refused before accepting
    assert r.exit_code == 4, r.output
    assert "does not exist" in r.output
    r = runner.invoke(main, ["transfer", "status", "--data", str(sp2.root)])
    assert r.exit_code == 4
    assert "no transfer here" in r.output
    r = runner.invoke(main, ["transfer", "accept", "--data", str(sp2.root), "--in", str(kept), "--peer-id", "sp1",
                             "--peer-cert", str(sp1_cert), "--out", str(tmp_path / "tm.cwt")])  # fmt: skip
    assert r.exit_code == 0, r.output

    # status: whole transfer id, distinct column names, 80 columns when piped
    r = iotdlm("transfer", "status", "--data", str(sp1.root), "--devices")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert any(tid in line for line in lines)
    header = next(line for line in lines if line.startswith("transfer"))
    names = re.split(r"\s{2,}", header.strip())
    assert len(names) == len(set(names))
    assert "pending 2" in r.stdout
    assert "sensor-00002" in r.stdout

    r = iotdlm("transfer", "status", "--data", str(sp1.root), "--devices", "--json")
    assert r.returncode == 0, r.stderr
    (t,) = json.loads(r.stdout)["transfers"]
    assert set(t) == {
        "transfer_id", "role", "state", "devices", "counts", "refused", "created_at", "updated_at", "device_status",
    }  # fmt: skip
    assert t["refused"] == 0
    assert (t["transfer_id"], t["role"], t["devices"]) == (tid, "sp1", 2)
    assert set(t["counts"]) == set(st.STATUSES)
    assert t["counts"]["pending"] == 2
    assert ISO_UTC.fullmatch(t["updated_at"])
    assert [d["device_id"] for d in t["device_status"]] == ["sensor-00001", "sensor-00002"]
    assert t["device_status"][0] == {
        "device_id": "sensor-00001", "status": "pending", "updated_at": t["device_status"][0]["updated_at"],
        "last_refused_message": None,
    }  # fmt: skip
