"""``iotdlm transfer`` for the device-facing routes (issue 13): deliver keeps each device's message
for cm's GET /transfer/message and points its fallbackURI at SP1's /transfer/fallback (never the
enroll URI); publish-update puts SP2's image where km serves GET /transfer/update."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from iotdlm.cli.transfer import _default_fallback_uri, transfer
from iotdlm.deployment import PASSPHRASE_ENV
from iotdlm.runtime import open_store
from iotdlm.transfer import messages as m
from tests.unit.test_transfer_cli import PW, _deployment, _factory_and_operational


def test_deliver_keeps_messages_for_cm_and_publish_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, PW)
    sp1, sp2 = _deployment(tmp_path / "sp1", "SP1"), _deployment(tmp_path / "sp2", "SP2")
    _factory_and_operational(sp1, "d1")
    cli = CliRunner()

    def ok(*args: str) -> str:
        r = cli.invoke(transfer, list(args), catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return r.output

    ok("init", "--data", str(sp1.root), "--provider-id", "sp1")  # no --fallback-uri: cm's route
    ok(
        "init",
        "--data",
        str(sp2.root),
        "--provider-id",
        "sp2",
        "--enroll-uri",
        "https://127.0.0.1:8443/.well-known/est",
    )
    sp1_cert = sp1.root / "transfer" / "identity" / "certificate.pem"
    sp2_cert = sp2.root / "transfer" / "identity" / "certificate.pem"
    ok("register-ca", "--data", str(sp2.root), "--cert", str(sp1.root / "ca" / "root.pem"),
       "--cert", str(sp1.root / "ca" / "factory.pem"))  # fmt: skip
    uil, tm = tmp_path / "uil.jws", tmp_path / "tm.cwt"
    ok("export", "--data", str(sp1.root), "--peer-id", "sp2", "--peer-cert", str(sp2_cert), "--device", "d1",
       "--out", str(uil))  # fmt: skip
    tid = m.transfer_id(m.sha256(uil.read_bytes()))
    ok("accept", "--data", str(sp2.root), "--in", str(uil), "--peer-id", "sp1", "--peer-cert", str(sp1_cert),
       "--out", str(tm))  # fmt: skip
    assert b"https://sp1.invalid/transfer/fallback" in tm.read_bytes()  # SP2 cannot know SP1's route
    out = ok("deliver", "--data", str(sp1.root), "--in", str(tm), "--out-dir", str(tmp_path / "msgs"))
    route = _default_fallback_uri(sp1)
    assert route.endswith(":8443/transfer/fallback")
    assert route in out.replace("\n", "")
    cwt = (tmp_path / "msgs" / "d1.cwt").read_bytes()
    assert route.encode() in cwt
    store = open_store(sp1)
    try:
        detail = json.loads(store.get_transfer_devices("sp1", tid, ["d1"])["d1"].detail)
    finally:
        store.close()
    assert base64.b64decode(detail["message"]) == cwt

    image = tmp_path / "fw.bin"
    image.write_bytes(b"firmware 5")
    missing = cli.invoke(transfer, ["publish-update", "--data", str(sp2.root), "--transfer", "ab" * 32,
                                    "--image", str(image), "--version", "5"])  # fmt: skip
    assert missing.exit_code == 4, missing.output
    ok("publish-update", "--data", str(sp2.root), "--transfer", tid, "--image", str(image), "--version", "5")
    assert (sp2.root / "transfer" / "updates" / tid / "image").read_bytes() == b"firmware 5"
    bad = cli.invoke(transfer, ["publish-update", "--data", str(sp2.root), "--transfer", tid,
                                "--image", str(image), "--version", "5\n"])  # fmt: skip
    assert bad.exit_code == 4, bad.output
