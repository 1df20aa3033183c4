"""`iotdlm ca renew` and `iotdlm ca certificate` (issue 14: what a step-ca user expects), run as the
operator would on a real deployment folder; and the RA rule they go through (operator renewal)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from iotdlm.cli.ca_extra import parse_serial
from iotdlm.cli.main import main
from iotdlm.deployment import Deployment
from iotdlm.errors import BadRequestError, ConflictError, NotAuthorizedError
from iotdlm.km.ra import Authorizer, CertRequestFacts, DeviceState, Grant, ModulePrincipal, PresentedCredential
from iotdlm.pki.chain import load_certificates_pem
from iotdlm.pki.keys import Algorithm, generate_key, load_private_key_pem
from iotdlm.runtime import open_store
from tests.helpers import make_csr

PASS = {"IOTDLM_CA_PASSPHRASE": "correct horse battery staple"}
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("site") / "data"
    r = CliRunner().invoke(main, ["init", "--data", str(data), "--dtype", "boardA"], env=PASS)
    assert r.exit_code == 0, r.output
    return data


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args), env=PASS)
    assert "Traceback" not in r.output
    return r.exit_code, r.output


def _certificate(site: Path, tmp: Path, device: str, *extra: str) -> dict[str, str]:
    code, out = _cli(
        "ca", "certificate", "--data", str(site), "--device-id", device, "--profile", "operational",
        "--key-out", str(tmp / f"{device}.key"), "--out", str(tmp / f"{device}.pem"), "--json", *extra,
    )  # fmt: skip
    assert code == 0, out
    result: dict[str, str] = json.loads(out)
    return result


def _record(site: Path, serial: str) -> tuple[str, str | None]:
    store = open_store(Deployment.load(site))
    try:
        (rec,) = store.find_by_serial(int(serial, 16))
        return rec.status, None if rec.superseded_by is None else format(rec.superseded_by, "x")
    finally:
        store.close()


def _audit_issuances(site: Path) -> list[dict[str, object]]:
    store = open_store(Deployment.load(site))
    try:
        return [rec.data for rec in store.iter_audit(start_seq=1) if rec.kind == "issuance"]
    finally:
        store.close()


# --- ca certificate ------------------------------------------------------------------------------
def test_certificate_writes_a_private_key_and_its_certificate(site: Path, tmp_path: Path) -> None:
    got = _certificate(site, tmp_path, "cert-1", "--key-type", "ed25519")
    key = load_private_key_pem((tmp_path / "cert-1.key").read_bytes(), None)
    leaf, issuing_ca = load_certificates_pem((tmp_path / "cert-1.pem").read_bytes())
    assert stat.S_IMODE(os.stat(tmp_path / "cert-1.key").st_mode) == 0o600
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    assert leaf.public_key().public_bytes(*raw) == key.public_key().public_bytes(*raw)
    assert format(leaf.serial_number, "x") == got["serial"]
    assert issuing_ca.subject == leaf.issuer
    leaf.verify_directly_issued_by(issuing_ca)
    assert _record(site, got["serial"]) == ("valid", None)


def test_certificate_refuses_to_overwrite_and_issues_nothing(site: Path, tmp_path: Path) -> None:
    first = _certificate(site, tmp_path, "cert-2")
    key_before = (tmp_path / "cert-2.key").read_bytes()
    code, out = _cli(
        "ca", "certificate", "--data", str(site), "--device-id", "cert-3", "--profile", "operational",
        "--key-out", str(tmp_path / "cert-2.key"), "--out", str(tmp_path / "other.pem"),
    )  # fmt: skip
    assert code == 4
    assert "exists; give --force" in out
    assert (tmp_path / "cert-2.key").read_bytes() == key_before
    assert not (tmp_path / "other.pem").exists()
    store = open_store(Deployment.load(site))
    assert store.count_certificates(device_id="cert-3") == 0
    store.close()
    second = _certificate(site, tmp_path, "cert-2", "--force")
    assert second["serial"] != first["serial"]
    assert (tmp_path / "cert-2.key").read_bytes() != key_before


def test_certificate_checks_the_folder_before_issuing(site: Path, tmp_path: Path) -> None:
    code, out = _cli(
        "ca", "certificate", "--data", str(site), "--device-id", "cert-4", "--profile", "operational",
        "--key-out", str(tmp_path / "no" / "such" / "k.pem"), "--out", str(tmp_path / "c.pem"),
    )  # fmt: skip
    assert code == 4
    assert "does not exist; create it first" in out
    store = open_store(Deployment.load(site))
    assert store.count_certificates(device_id="cert-4") == 0
    store.close()


def test_certificate_for_a_device_holding_one_points_at_renew(site: Path, tmp_path: Path) -> None:
    first = _certificate(site, tmp_path, "cert-5")
    code, out = _cli(
        "ca", "certificate", "--data", str(site), "--device-id", "cert-5", "--profile", "operational",
        "--key-out", str(tmp_path / "k2.pem"), "--out", str(tmp_path / "c2.pem"),
    )  # fmt: skip
    assert code == 4
    assert f"iotdlm ca renew {first['serial']}" in out


# --- ca renew --------------------------------------------------------------------------------------
def test_renew_same_key_supersedes_and_is_audited(site: Path, tmp_path: Path) -> None:
    old = _certificate(site, tmp_path, "renew-1")
    code, out = _cli("ca", "renew", "--data", str(site), old["serial"], "--out", str(tmp_path / "new.pem"), "--json")
    assert code == 0, out
    new = json.loads(out)
    assert new["supersedes"] == old["serial"]
    assert (new["device_id"], new["profile"]) == ("renew-1", "operational")
    old_cert = x509.load_pem_x509_certificate((tmp_path / "renew-1.pem").read_bytes())
    new_cert = load_certificates_pem((tmp_path / "new.pem").read_bytes())[0]
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert new_cert.public_key().public_bytes(*spki) == old_cert.public_key().public_bytes(*spki)
    assert new_cert.subject == old_cert.subject
    assert _record(site, old["serial"]) == ("superseded", new["serial"])
    assert _record(site, new["serial"]) == ("valid", None)
    (audited,) = [d for d in _audit_issuances(site) if d["serial"] == new["serial"]]
    assert audited["rule"] == "operator-renewal"
    assert audited["supersedes"] == f"operational:{old['serial']}"
    # the superseded certificate is not renewed a second time
    code, out = _cli("ca", "renew", "--data", str(site), old["serial"])
    assert code == 4
    assert "is superseded; only a valid certificate is renewed" in out


def test_renew_with_a_new_key_and_the_colon_serial(site: Path, tmp_path: Path) -> None:
    old = _certificate(site, tmp_path, "renew-2")
    key = generate_key(Algorithm.P256)
    (tmp_path / "new.csr").write_bytes(make_csr(key, "renew-2"))
    colon = ":".join(old["serial"].zfill(40)[i : i + 2] for i in range(0, 40, 2)).upper()
    code, out = _cli("ca", "renew", "--data", str(site), colon, "--csr", str(tmp_path / "new.csr"), "--json")
    assert code == 0, out
    new = json.loads(out)
    assert new["key"] == "new (from --csr)"
    store = open_store(Deployment.load(site))
    (rec,) = store.find_by_serial(int(new["serial"], 16))
    store.close()
    cert = x509.load_der_x509_certificate(rec.der)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def test_renew_refuses_a_factory_certificate(site: Path, tmp_path: Path) -> None:
    code, out = _cli(
        "ca", "certificate", "--data", str(site), "--device-id", "renew-3", "--profile", "factory",
        "--key-out", str(tmp_path / "k.pem"), "--out", str(tmp_path / "c.pem"), "--json",
    )  # fmt: skip
    assert code == 0, out
    code, out = _cli("ca", "renew", "--data", str(site), json.loads(out)["serial"])
    assert code == 4
    assert "factory certificates are not renewable" in out


def test_renew_checks_out_before_renewing(site: Path, tmp_path: Path) -> None:
    old = _certificate(site, tmp_path, "renew-4")
    code, out = _cli("ca", "renew", "--data", str(site), old["serial"], "--out", str(tmp_path / "nope" / "x.pem"))
    assert code == 4
    assert "does not exist" in out
    assert _record(site, old["serial"]) == ("valid", None)


def test_renew_unknown_and_bad_serials(site: Path) -> None:
    code, out = _cli("ca", "renew", "--data", str(site), "abcdef")
    assert code == 4
    assert "no certificate with serial abcdef" in out
    code, out = _cli("ca", "renew", "--data", str(site), "not-a-serial")
    assert code == 4
    assert "is not a certificate serial" in out


def test_renew_through_the_real_entry_point(site: Path, tmp_path: Path) -> None:
    old = _certificate(site, tmp_path, "renew-5")
    env = {**os.environ, **PASS, "PYTHONPATH": str(SRC)}
    argv = [sys.executable, "-m", "iotdlm.cli.main", "ca", "renew", "--data", str(site), old["serial"], "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["supersedes"] == old["serial"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 4
    assert "Traceback" not in done.stderr
    assert "superseded" in done.stderr


# --- the serial parser -----------------------------------------------------------------------------
@given(st.integers(min_value=1, max_value=2**159))
def test_parse_serial_reads_both_spellings(value: int) -> None:
    text = format(value, "x")
    padded = text.zfill(len(text) + len(text) % 2)
    colon = ":".join(padded[i : i + 2] for i in range(0, len(padded), 2))
    assert parse_serial(text) == parse_serial(colon.upper()) == value


@given(st.text(max_size=60))
def test_parse_serial_never_crashes(text: str) -> None:
    field = None
    try:
        parse_serial(text)
    except BadRequestError as exc:
        field = exc.field
    assert field in (None, "serial")


# --- the RA rule ---------------------------------------------------------------------------------
ADMIN = ModulePrincipal("admin", None, "fp-admin")
VALID = PresentedCredential("operational", "dev-1", "valid", "operational", 12)


ACTIVE = DeviceState("boardA", "active")


def _renewal(
    replaces: PresentedCredential | None,
    *,
    renewable: bool = True,
    pop: str = "signature",
    principal: ModulePrincipal = ADMIN,
    state: DeviceState = ACTIVE,
) -> Grant:
    facts = CertRequestFacts(
        operation="renew", profile="operational", device_id="dev-1", pop=pop,  # type: ignore[arg-type]
        device=state, replaces=replaces, renewable=renewable,
    )  # fmt: skip
    return Authorizer().authorize(principal, facts)


def test_operator_renewal_grants_and_supersedes() -> None:
    grant = _renewal(VALID)
    assert (grant.rule, grant.supersedes, grant.dtype) == ("operator-renewal", ("operational", 12), "boardA")


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ({"replaces": None}, "names the certificate it replaces"),
        ({"replaces": PresentedCredential("operational", "dev-1", "revoked", "operational", 12)}, "is revoked"),
        ({"replaces": PresentedCredential("operational", "dev-2", "valid", "operational", 12)}, "keeps the device"),
        ({"replaces": PresentedCredential("factory", "dev-1", "valid", "factory", 12)}, "keeps the device"),
        ({"replaces": VALID, "renewable": False}, "not renewable"),
        ({"replaces": VALID, "pop": "ra_verified"}, "raVerified"),
        ({"replaces": VALID, "principal": ModulePrincipal("cm", None, "fp")}, "may not renew"),
        ({"replaces": VALID, "principal": ModulePrincipal("pm", "boardA", "fp")}, "may not renew"),
    ],
    ids=["no-old", "revoked", "other-device", "other-profile", "not-renewable", "ra-verified", "cm", "pm"],
)
def test_operator_renewal_refusals(case: dict[str, object], error: str) -> None:
    with pytest.raises(NotAuthorizedError, match=error):
        _renewal(**case)  # type: ignore[arg-type]


def test_operator_renewal_of_a_retired_device() -> None:
    with pytest.raises(ConflictError, match="decommissioned"):
        _renewal(VALID, state=DeviceState("boardA", "retired"))
