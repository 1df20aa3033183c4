"""`iotdlm init`: what it leaves on disk (modes) and the operator's enterprise number."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from iotdlm.cli.main import main
from iotdlm.deployment import CONFIG_FILE, Deployment
from iotdlm.errors import BadRequestError
from iotdlm.pki.names import device_id_of, module_of
from iotdlm.pki.profiles import policy_oid

PASS = {"IOTDLM_CA_PASSPHRASE": "correct horse battery staple"}


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("site") / "data"
    # no passphrase given: init generates one into secrets/
    r = CliRunner().invoke(
        main, ["init", "--data", str(data), "--dtype", "boardA", "--enterprise-number", "4242"], env={}
    )
    assert r.exit_code == 0, r.output
    return data


def test_folders_are_owner_only(site: Path) -> None:
    for d in (site, site / "db", site / "secrets", site / "ca", site / "modules", site / "nats", site / "logs"):
        assert _mode(d) == 0o700, f"{d}: {oct(_mode(d))}"
    assert _mode(site / "secrets" / "ca-passphrase") == 0o600


def test_database_file_and_its_wal_are_owner_only(site: Path) -> None:
    db = site / "db" / "iotdlm.db"
    assert _mode(db) == 0o600
    # SQLite gives -wal and -shm the database file's mode: open it in WAL mode and write
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE IF NOT EXISTS t (x)")
        con.execute("INSERT INTO t VALUES (1)")
        con.commit()
        for suffix in ("-wal", "-shm"):
            side = db.with_name(db.name + suffix)
            assert side.exists(), side
            assert _mode(side) == 0o600, f"{side}: {oct(_mode(side))}"
    finally:
        con.close()


def test_enterprise_number_is_written_and_used(site: Path) -> None:
    assert "enterprise_number = 4242" in (site / CONFIG_FILE).read_text()
    dep = Deployment.load(site)
    assert dep.config.enterprise_number == 4242
    km = dep.identity("km").certificate
    san = km.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)] == ["urn:dev:org:4242-module:km"]
    assert module_of(km) == ("km", None)
    policies = km.extensions.get_extension_for_class(x509.CertificatePolicies).value
    assert [p.policy_identifier.dotted_string for p in policies] == ["1.3.6.1.4.1.4242.1.3"]
    assert dep.profiles()["factory"].policy_oid == policy_oid(4242, "factory")


def test_old_config_loads_with_the_default_enterprise_number(site: Path, tmp_path: Path) -> None:
    text = (site / CONFIG_FILE).read_text()
    old = tmp_path / "old"
    old.mkdir()
    (old / CONFIG_FILE).write_text("\n".join(line for line in text.splitlines() if "enterprise_number" not in line))
    dep = Deployment.load(old)
    assert dep.config.enterprise_number == 32473
    assert dep.profiles()["operational"].policy_oid.dotted_string == "1.3.6.1.4.1.32473.1.2"


@pytest.mark.parametrize("bad", ["0", "-1", "4294967296", "x"])
def test_a_bad_enterprise_number_is_refused(tmp_path: Path, bad: str) -> None:
    r = CliRunner().invoke(main, ["init", "--data", str(tmp_path / "d"), "--enterprise-number", bad], env=PASS)
    assert r.exit_code in (2, 4), r.output  # 2: click's own refusal of a non-integer
    assert "Traceback" not in r.output
    assert not (tmp_path / "d" / CONFIG_FILE).exists()


def test_bad_enterprise_number_in_config_is_a_clear_error(site: Path, tmp_path: Path) -> None:
    text = (site / CONFIG_FILE).read_text().replace("enterprise_number = 4242", "enterprise_number = 0")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / CONFIG_FILE).write_text(text)
    with pytest.raises(BadRequestError, match="enterprise number"):
        Deployment.load(bad)


def test_legacy_certificate_names_still_parse() -> None:
    """Certificates issued before the RFC 9039 names (a factory certificate lives 20 years)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from tests.helpers import NOW, make_pki

    pki = make_pki()
    key = ec.generate_private_key(ec.SECP256R1())

    def cert(uri: str) -> x509.Certificate:
        from iotdlm.pki.names import device_subject
        from iotdlm.pki.profiles import DEFAULT_PROFILES

        return pki.cas["operational"].issue(
            DEFAULT_PROFILES["operational"],
            key.public_key(),
            device_subject("dev-9", "T", "boardA"),
            now=NOW,
            serial=x509.random_serial_number(),
            uris=[uri],
        )

    assert device_id_of(cert("urn:iotdlm:device:dev-9")) == "dev-9"
    assert module_of(cert("urn:iotdlm:module:pm:dtype:boardA")) == ("pm", "boardA")
    assert module_of(cert("urn:iotdlm:module:km")) == ("km", None)
