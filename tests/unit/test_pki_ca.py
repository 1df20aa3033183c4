"""The CA hierarchy and issued certificates: RFC 5280 shape, and openssl agrees."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from iotdlm.pki.ca import PublicUrls
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.pki.names import device_id_of, device_subject, device_uri
from iotdlm.pki.profiles import DEFAULT_PROFILES
from tests.helpers import NOW, ORG, make_pki, pem

ALGS = list(Algorithm)


@pytest.fixture(scope="module", params=ALGS, ids=[a.value for a in ALGS])
def pki_and_alg(request: pytest.FixtureRequest) -> tuple[object, Algorithm]:
    return make_pki(request.param), request.param


def _issue(pki, profile: str, device_id: str = "dev-001", alg: Algorithm = Algorithm.P256) -> x509.Certificate:
    p = DEFAULT_PROFILES[profile]
    key = generate_key(alg)
    return pki.cas[p.issuer].issue(
        p,
        key.public_key(),
        device_subject(device_id, ORG, "boardA"),
        now=NOW,
        serial=x509.random_serial_number(),
        uris=[device_uri(device_id)],
        urls=PublicUrls("http://127.0.0.1:8080"),
    )


def test_ca_certificates_have_rfc5280_ca_extensions(pki_and_alg) -> None:
    pki, _ = pki_and_alg
    for cert in [pki.root, *(c.certificate for c in pki.cas.values())]:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert bc.critical
        assert bc.value.ca
        assert ku.critical
        assert ku.value.key_cert_sign
        assert ku.value.crl_sign
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        assert cert.serial_number > 0
    for ca in pki.cas.values():
        aki = ca.certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        root_ski = pki.root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert aki.key_identifier == root_ski.digest
        assert ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0


@pytest.mark.parametrize("profile", ["factory", "operational", "ocsp"])
def test_end_entity_shape(pki_and_alg, profile: str) -> None:
    pki, alg = pki_and_alg
    cert = _issue(pki, profile, alg=alg)
    p = DEFAULT_PROFILES[profile]
    assert cert.issuer == pki.cas[p.issuer].certificate.subject
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).critical
    ski = pki.cas[p.issuer].certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert 64 <= cert.serial_number.bit_length() <= 159
    assert device_id_of(cert) == "dev-001"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == list(p.eku)
    if p.with_revocation_pointers:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
        assert aia[0].access_location.value == "http://127.0.0.1:8080/ocsp"
        cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        part = cert.serial_number % 64
        assert cdp[0].full_name[0].value == f"http://127.0.0.1:8080/crl/{p.issuer}/{part}.crl"
    else:
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess)
    if profile == "ocsp":
        cert.extensions.get_extension_for_class(x509.OCSPNoCheck)
        assert ExtendedKeyUsageOID.OCSP_SIGNING in eku


def test_validity_capped_at_issuer() -> None:
    pki = make_pki()
    cert = _issue(pki, "factory")  # 20-year profile under a ~8-year CA
    assert cert.not_valid_after_utc == pki.cas["factory"].certificate.not_valid_after_utc
    op = _issue(pki, "operational")
    assert op.not_valid_after_utc - NOW == dt.timedelta(days=90)


def test_generalized_time_after_2049() -> None:
    """RFC 5280 4.1.2.5: dates in 2050 or later are GeneralizedTime; openssl must still parse them."""
    pki = make_pki(now=dt.datetime(2045, 1, 1, tzinfo=dt.UTC))
    assert pki.root.not_valid_after_utc.year >= 2050
    der = pki.root.public_bytes(serialization.Encoding.DER)
    assert b"\x18\x0f" in der  # GeneralizedTime tag + 15-byte length
    assert b"\x17\x0d" in der  # notBefore (2044) stays UTCTime


@pytest.mark.openssl
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
@pytest.mark.parametrize("profile", ["factory", "operational"])
def test_openssl_verify_accepts_chain(tmp_path: Path, pki_and_alg, profile: str) -> None:
    pki, alg = pki_and_alg
    cert = _issue(pki, profile, alg=alg)
    issuer = pki.cas[DEFAULT_PROFILES[profile].issuer]
    (tmp_path / "root.pem").write_bytes(pem(pki.root))
    (tmp_path / "untrusted.pem").write_bytes(pem(issuer.certificate))
    (tmp_path / "leaf.pem").write_bytes(pem(cert))
    attime = str(int(NOW.timestamp()) + 3600)
    out = subprocess.run(
        [
            "openssl",
            "verify",
            "-attime",
            attime,
            "-x509_strict",
            "-purpose",
            "sslclient",
            "-CAfile",
            str(tmp_path / "root.pem"),
            "-untrusted",
            str(tmp_path / "untrusted.pem"),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("OK")


@pytest.mark.openssl
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_openssl_verify_rejects_wrong_chain(tmp_path: Path) -> None:
    """The check above can fail: a certificate from another hierarchy does not verify."""
    pki, other = make_pki(), make_pki()
    cert = _issue(other, "operational")
    (tmp_path / "root.pem").write_bytes(pem(pki.root))
    (tmp_path / "untrusted.pem").write_bytes(pem(pki.cas["operational"].certificate))
    (tmp_path / "leaf.pem").write_bytes(pem(cert))
    out = subprocess.run(
        [
            "openssl",
            "verify",
            "-attime",
            str(int(NOW.timestamp()) + 3600),
            "-CAfile",
            str(tmp_path / "root.pem"),
            "-untrusted",
            str(tmp_path / "untrusted.pem"),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode != 0
