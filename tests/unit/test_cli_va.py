"""The operator's VA and audit commands on a real deployment folder, with openssl as the judge."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from iotdlm.cli.main import main
from iotdlm.deployment import Deployment
from iotdlm.pki.keys import Algorithm, generate_key
from tests.helpers import make_csr

ENV = {"IOTDLM_CA_PASSPHRASE": "pw", "COLUMNS": "200"}
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")


def _run(*args: str) -> str:
    r = CliRunner().invoke(main, list(args), env=ENV)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, list[x509.Certificate]]:
    data = tmp_path / "data"
    _run("init", "--data", str(data), "--dtype", "boardA", "--nats-port", "1")  # port 1: km never reachable
    certs = []
    for i in range(3):
        csr = tmp_path / f"d{i}.csr"
        csr.write_bytes(make_csr(generate_key(Algorithm.P256), f"dev-{i}"))
        out = tmp_path / f"d{i}.pem"
        _run(
            "ca",
            "issue",
            "--data",
            str(data),
            "--csr",
            str(csr),
            "--device-id",
            f"dev-{i}",
            "--profile",
            "operational",
            "--dtype",
            "boardA",
            "--out",
            str(out),
        )
        certs.append(x509.load_pem_x509_certificate(out.read_bytes()))
    return data, certs


@pytest.mark.openssl
@needs_openssl
def test_revoke_then_crl_and_ocsp_agree_with_openssl(site: tuple[Path, list[x509.Certificate]], tmp_path: Path) -> None:
    data, certs = site
    victim = certs[0]
    serial = format(victim.serial_number, "x")
    out = _run("ca", "revoke", "--data", str(data), serial, "--reason", "keyCompromise")
    assert "revoked directly in the store" in out
    dep = Deployment.load(data)
    partition = victim.serial_number % dep.config.crl_partitions
    crl = tmp_path / "p.crl"
    _run("ca", "crl", "--data", str(data), "--issuer", "operational", "--partition", str(partition), "--out", str(crl))
    bundle = tmp_path / "ca.pem"
    _run("ca", "chain", "--data", str(data), "--issuer", "operational", "--out", str(bundle))
    v = subprocess.run(
        ["openssl", "crl", "-in", str(crl), "-inform", "DER", "-noout", "-verify", "-CAfile", str(bundle)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert v.returncode == 0, v.stderr
    assert "verify OK" in v.stdout + v.stderr
    assert victim.serial_number in {r.serial_number for r in x509.load_der_x509_crl(crl.read_bytes())}

    status = _run("va", "ocsp", "--data", str(data), "--serial", serial)
    assert "REVOKED" in status
    assert "key_compromise" in status or "keyCompromise" in status
    assert "nonce echoed" in status
    good = _run("va", "ocsp", "--data", str(data), "--serial", format(certs[1].serial_number, "x"), "--no-nonce")
    assert "GOOD" in good


def test_decommission_and_audit_verify(site: tuple[Path, list[x509.Certificate]]) -> None:
    data, _certs = site
    out = _run("device", "decommission", "--data", str(data), "dev-1")
    assert "device dev-1 is retired" in out
    r = CliRunner().invoke(main, ["device", "decommission", "--data", str(data), "dev-1"], env=ENV)
    assert r.exit_code == 4
    assert "retired" in r.output
    listing = _run("audit", "list", "--data", str(data), "--limit", "100")
    assert "decommission" in listing
    assert "issuance" in listing
    assert "checkpoint signed" in _run("audit", "checkpoint", "--data", str(data))
    assert "audit log intact" in _run("audit", "verify", "--data", str(data))
    with sqlite3.connect(data / "db" / "iotdlm.db") as db:
        db.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 2")
    r = CliRunner().invoke(main, ["audit", "verify", "--data", str(data)], env=ENV)
    assert r.exit_code == 4
    assert "record 2" in r.output


def test_revoke_with_a_bad_serial_is_a_clear_refusal(site: tuple[Path, list[x509.Certificate]]) -> None:
    data, _ = site
    r = CliRunner().invoke(main, ["ca", "revoke", "--data", str(data), "not-hex"], env=ENV)
    assert r.exit_code == 4
    assert "not hexadecimal" in r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("reason", ["removeFromCRL", "certificateHold"])
def test_remove_from_crl_and_hold_are_refused_and_change_nothing(
    site: tuple[Path, list[x509.Certificate]], reason: str
) -> None:
    data, certs = site
    serial = format(certs[2].serial_number, "x")
    for args in (
        ["ca", "revoke", "--data", str(data), serial, "--reason", reason],
        ["device", "revoke", "--data", str(data), "dev-2", "--reason", reason],
        ["device", "decommission", "--data", str(data), "dev-2", "--reason", reason],
        ["ca", "revoke-ca", "--data", str(data), "factory", "--reason", reason, "--yes"],
    ):
        r = CliRunner().invoke(main, args, env=ENV)
        assert r.exit_code == 4, r.output
        assert reason in r.output
        assert "Traceback" not in r.output
    assert "GOOD" in _run("va", "ocsp", "--data", str(data), "--serial", serial)
    assert "1 certificate(s) revoked" in _run(
        "device", "revoke", "--data", str(data), "dev-2", "--reason", "keyCompromise"
    )


@pytest.mark.openssl
@needs_openssl
def test_revoke_ca_needs_yes_and_lists_the_ca_on_the_root_crl(
    site: tuple[Path, list[x509.Certificate]], tmp_path: Path
) -> None:
    data, _ = site
    r = CliRunner().invoke(main, ["ca", "revoke-ca", "--data", str(data), "operational"], env=ENV)
    assert r.exit_code == 4
    assert "--yes" in r.output
    crl_path = tmp_path / "root.crl"
    _run("ca", "crl", "--data", str(data), "--issuer", "root", "--partition", "0", "--out", str(crl_path))
    assert len(x509.load_der_x509_crl(crl_path.read_bytes())) == 0

    out = _run("ca", "revoke-ca", "--data", str(data), "operational", "--reason", "cACompromise", "--yes")
    assert "/crl/root/0.crl" in out
    dep = Deployment.load(data)
    ca_serial = dep.ca_certificate("operational").serial_number
    _run("ca", "crl", "--data", str(data), "--issuer", "root", "--partition", "0", "--out", str(crl_path))
    crl = x509.load_der_x509_crl(crl_path.read_bytes())
    assert [e.serial_number for e in crl] == [ca_serial]
    v = subprocess.run(
        [
            *("openssl", "crl", "-in", str(crl_path), "-inform", "DER", "-noout", "-verify"),
            *("-CAfile", str(data / "ca" / "root.pem")),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert v.returncode == 0, v.stderr
    assert "verify OK" in v.stdout + v.stderr
    again = CliRunner().invoke(main, ["ca", "revoke-ca", "--data", str(data), "operational", "--yes"], env=ENV)
    assert again.exit_code == 4
    assert "already revoked" in again.output
    assert "revocation" in _run("audit", "list", "--data", str(data), "--kind", "revocation")
    # a revoked CA issues nothing more; the other CAs go on
    csr = tmp_path / "late.csr"
    csr.write_bytes(make_csr(generate_key(Algorithm.P256), "dev-late"))
    issue = ["ca", "issue", "--data", str(data), "--csr", str(csr), "--device-id", "dev-late"]
    late = CliRunner().invoke(main, [*issue, "--profile", "operational", "--out", str(tmp_path / "op.pem")], env=ENV)
    assert late.exit_code == 4, late.output
    assert "operational CA is revoked" in late.output
    assert not (tmp_path / "op.pem").exists()
    _run(*issue, "--profile", "factory", "--out", str(tmp_path / "factory.pem"))


def test_the_cm_module_certificate_is_revocable_and_shows_on_ocsp_and_its_crl(
    site: tuple[Path, list[x509.Certificate]], tmp_path: Path
) -> None:
    data, _ = site
    dep = Deployment.load(data)
    cm_cert = dep.identity("cm").certificate
    serial = format(cm_cert.serial_number, "x")
    assert "GOOD" in _run("va", "ocsp", "--data", str(data), "--serial", serial, "--issuer", "service")
    _run("ca", "revoke", "--data", str(data), serial, "--issuer", "service", "--reason", "keyCompromise")
    assert "REVOKED" in _run("va", "ocsp", "--data", str(data), "--serial", serial, "--issuer", "service")
    partition = cm_cert.serial_number % dep.config.crl_partitions
    crl = tmp_path / "s.crl"
    _run("ca", "crl", "--data", str(data), "--issuer", "service", "--partition", str(partition), "--out", str(crl))
    assert cm_cert.serial_number in {e.serial_number for e in x509.load_der_x509_crl(crl.read_bytes())}


def test_audit_verify_checks_the_anchor_folder(site: tuple[Path, list[x509.Certificate]], tmp_path: Path) -> None:
    data, _certs = site
    anchors = tmp_path / "anchors"
    config = data / "iotdlm.toml"
    config.write_text(f'audit_anchor_dir = "{anchors}"\n' + config.read_text())
    _run("device", "decommission", "--data", str(data), "dev-1")
    assert "checkpoint signed" in _run("audit", "checkpoint", "--data", str(data))
    assert len(list(anchors.glob("tree-head-*.json"))) == 1
    out = _run("audit", "verify", "--data", str(data))
    assert "1 kept outside it" in out
    assert "audit log intact" in out
    with sqlite3.connect(data / "db" / "iotdlm.db") as db:
        (n,) = db.execute("SELECT max(seq) FROM audit_log").fetchone()
        db.execute("DELETE FROM audit_log WHERE seq > 2")
        db.execute("DELETE FROM audit_checkpoints")
    r = CliRunner().invoke(
        main, ["audit", "verify", "--data", str(data), "--anchor-dir", str(tmp_path / "none")], env=ENV
    )
    assert r.exit_code == 0, r.output  # without the anchors the cut cannot be seen ...
    assert "anchor folder" in " ".join(r.output.split())  # ... and verify says it did not look
    r = CliRunner().invoke(main, ["audit", "verify", "--data", str(data)], env=ENV)
    assert r.exit_code == 4, r.output
    flat = " ".join(r.output.split())  # rich wraps long lines at spaces
    assert "the store has 2 records; the checkpoint of" in flat
    assert f"commits to {n}: {n - 2} records after #2 were deleted" in flat
    assert "Traceback" not in r.output
    copy = tmp_path / "from-cm.json"
    copy.write_bytes(next(anchors.glob("*.json")).read_bytes())
    r = CliRunner().invoke(
        main,
        ["audit", "verify", "--data", str(data), "--anchor-dir", str(tmp_path / "none"), "--checkpoint", str(copy)],
        env=ENV,
    )
    assert r.exit_code == 4, r.output
    assert "from-cm.json commits to" in " ".join(r.output.split())
