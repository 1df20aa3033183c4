"""``iotdlm transfer``: both operators' commands on two deployments, from init to revoke-old and
status; exit code 4 for a refused message. km runs in-process here (no NATS: revoke-old falls back
to revoking directly in the store, and says so)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from iotdlm.cli.transfer import transfer
from iotdlm.clock import SystemClock
from iotdlm.deployment import PASSPHRASE_ENV, Deployment, init_deployment
from iotdlm.pki.chain import der
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.runtime import build_km, open_store, sealer_for
from iotdlm.transfer import messages as m
from iotdlm.wire import km as msg
from iotdlm.wire.km import AUDIENCE, OP_ISSUE
from tests.helpers import make_csr, proven_est

PW = "pw"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _deployment(root: Path, org: str) -> Deployment:
    dep, _ = init_deployment(
        root,
        organization=org,
        algorithm=Algorithm.P256,
        dtypes=["sensor"],
        passphrase=PW.encode(),
        nats_port=_free_port(),  # nothing listens: the CLI falls back to acting on the store
        now=SystemClock().now(),
    )
    return dep


def _factory_and_operational(dep: Deployment, device_id: str) -> tuple[object, x509.Certificate]:
    clock = SystemClock()
    store = open_store(dep)
    try:
        km = build_km(dep, store, clock, passphrase=PW.encode())
        key = generate_key(Algorithm.P256)
        pm = sealer_for(dep.identity("pm-sensor"))
        item = msg.IssueItem(device_id=device_id, profile="factory", csr=make_csr(key, device_id))
        factory = x509.load_der_x509_certificate(
            km.issue(pm.seal(OP_ISSUE, item, aud=AUDIENCE, now=clock.now())).certificate
        )
        csr = make_csr(key, device_id)
        proven_est(km, sealer_for(dep.identity("cm")), clock.now(), "simpleenroll", key, der(factory), csr)
        return key, factory
    finally:
        store.close()


def _enroll_at(dep: Deployment, key: object, factory: x509.Certificate, device_id: str) -> None:
    clock = SystemClock()
    store = open_store(dep)
    try:
        km = build_km(dep, store, clock, passphrase=PW.encode())
        csr = make_csr(key, device_id)  # type: ignore[arg-type]
        proven_est(km, sealer_for(dep.identity("cm")), clock.now(), "simpleenroll", key, der(factory), csr)  # type: ignore[arg-type]
    finally:
        store.close()


def test_transfer_commands_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, PW)
    sp1, sp2 = _deployment(tmp_path / "sp1", "SP1"), _deployment(tmp_path / "sp2", "SP2")
    devs = {d: _factory_and_operational(sp1, d) for d in ("d1", "d2")}
    cli = CliRunner()

    def ok(*args: str) -> str:
        r = cli.invoke(transfer, list(args), catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return r.output

    ok("init", "--data", str(sp1.root), "--provider-id", "sp1", "--fallback-uri", "https://sp1.example/updates")
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
    uil = tmp_path / "uil.jws"
    fw = tmp_path / "fw.bin"
    fw.write_bytes(b"firmware")
    out = ok("export", "--data", str(sp1.root), "--peer-id", "sp2", "--peer-cert", str(sp2_cert), "--device", "d1",
             "--device", "d2", "--suit-seq", "4", "--suit-uri", "https://sp1.example/suit/{dtype}/4",
             "--reference", str(fw), "--out", str(uil))  # fmt: skip
    tid = m.transfer_id(m.sha256(uil.read_bytes()))
    assert tid in out
    tm = tmp_path / "tm.cwt"
    ok("accept", "--data", str(sp2.root), "--in", str(uil), "--peer-id", "sp1", "--peer-cert", str(sp1_cert),
       "--update-uri", "https://updates.sp2.example", "--out", str(tm))  # fmt: skip
    # accepting the same UpdateInfoList again is refused (exit code 4)
    again = cli.invoke(transfer, ["accept", "--data", str(sp2.root), "--in", str(uil), "--peer-id", "sp1",
                                  "--peer-cert", str(sp1_cert), "--out", str(tmp_path / "tm2")])  # fmt: skip
    assert again.exit_code == 4, again.output
    # an altered TransferMessage is refused by SP1 (exit code 4), audited
    bad = tmp_path / "bad.cwt"
    raw = bytearray(tm.read_bytes())
    raw[-70] ^= 1
    bad.write_bytes(bytes(raw))
    r = cli.invoke(transfer, ["deliver", "--data", str(sp1.root), "--in", str(bad), "--out-dir", str(tmp_path / "x")])
    assert r.exit_code == 4, r.output
    msgs = tmp_path / "msgs"
    ok("deliver", "--data", str(sp1.root), "--in", str(tm), "--out-dir", str(msgs))
    assert sorted(p.name for p in msgs.iterdir()) == ["d1.cwt", "d2.cwt"]
    sp1_transfer = x509.load_pem_x509_certificate(sp1_cert.read_bytes())
    # the message names SP1's transfer certificate by x5t: a device holding it finds it
    _m, chain = m.peek_device_message((msgs / "d1.cwt").read_bytes(), [sp1_transfer])
    assert chain[0].subject == sp1_transfer.subject
    # a TransferMessage SP1 took already (here by file, as over the network by accept --send) is
    # delivered again by its transfer id: new messages, kept for cm, no file needed
    out = ok("deliver", "--data", str(sp1.root), "--transfer", tid)
    assert "2 device message(s) waiting at cm" in out
    for args, words in (
        ([], "--in FILE, or --transfer ID"),
        (["--in", str(tm), "--transfer", tid], "--in FILE, or --transfer ID"),
        (["--transfer", "NOT-AN-ID"], "a transfer id is 32 lower-case hex digits"),
        (["--transfer", "0" * 32], "no transfer"),
    ):
        r = cli.invoke(transfer, ["deliver", "--data", str(sp1.root), *args])
        assert r.exit_code == 4, r.output
        assert words in " ".join(r.output.split()), r.output
        assert "Traceback" not in r.output

    key, factory = devs["d1"]
    _enroll_at(sp2, key, factory, "d1")  # d1 re-enrolls with CA2 (as cm would relay it)
    conf = tmp_path / "confirm.cwt"
    ok("confirm", "--data", str(sp2.root), "--transfer", tid, "--out", str(conf))
    out = ok("revoke-old", "--data", str(sp1.root), "--in", str(conf))
    assert "1 device(s) revoked-at-CA1" in out
    assert "directly in the store" in out
    replay = cli.invoke(transfer, ["revoke-old", "--data", str(sp1.root), "--in", str(conf)])
    assert replay.exit_code == 4, replay.output

    out1 = ok("status", "--data", str(sp1.root), "--devices")
    assert tid in out1
    assert "revoked-at-CA1" in out1
    out2 = ok("status", "--data", str(sp2.root), "--transfer", tid, "--role", "sp2", "--devices")
    assert "enrolled" in out2
    store = open_store(sp1)
    try:
        assert store.list_certificates(device_id="d1", profile="operational")[0].status == "revoked"
        assert store.list_certificates(device_id="d2", profile="operational")[0].status == "valid"
        kinds = [r.kind for r in store.list_audit(kind="refused", limit=10)]
        assert len(kinds) >= 2  # the altered TransferMessage and the replayed confirmation
    finally:
        store.close()
    missing = cli.invoke(transfer, ["status", "--data", str(sp1.root), "--transfer", "nope"])
    assert missing.exit_code == 4
