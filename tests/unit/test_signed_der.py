"""pki/signed_der (ADR 0025): certificates, CRLs and OCSP responses signed by a Signer that offers
only ``sign(data)`` -- as an HSM does -- are what cryptography parses and verifies, byte for byte
the structure cryptography built; a Signer that signs something else is caught before anything
is returned. Runs without an HSM: the foreign signer here wraps an in-memory key."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from iotdlm.errors import BadSignatureError
from iotdlm.pki import ca as pki_ca
from iotdlm.pki import ocsp as pki_ocsp
from iotdlm.pki import signed_der
from iotdlm.pki.keys import Algorithm, KeySigner, PrivateKey, PublicKey, generate_key, sign_bytes, verify_bytes
from iotdlm.pki.profiles import DEFAULT_PROFILES
from tests.helpers import NOW, ORG

ALGS = [Algorithm.P256, Algorithm.P384, Algorithm.RSA3072]


class ForeignSigner:
    """A Signer that, like an HSM's, never hands out its key: only ``sign`` touches it."""

    def __init__(self, key: PrivateKey, *, wrong: bool = False) -> None:
        self._key = key
        self._wrong = wrong
        self.public_key: PublicKey = key.public_key()
        self.algorithm = KeySigner(key).algorithm
        self._template = signed_der.template_key(self.algorithm)

    def sign(self, data: bytes) -> bytes:
        return sign_bytes(self._key, data + b"x" if self._wrong else data)

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return signed_der.sign_certificate(builder, self, self._template)

    def sign_crl(self, builder: x509.CertificateRevocationListBuilder) -> x509.CertificateRevocationList:
        return signed_der.sign_crl(builder, self, self._template)

    def sign_ocsp(self, builder: ocsp.OCSPResponseBuilder, responder: x509.Certificate) -> ocsp.OCSPResponse:
        return signed_der.sign_ocsp_response(builder, responder, self, self._template)


@pytest.fixture(scope="module", params=ALGS, ids=str)
def hierarchy(request: pytest.FixtureRequest) -> tuple[ForeignSigner, x509.Certificate, pki_ca.IssuingCA]:
    root_signer = ForeignSigner(generate_key(request.param))
    root = pki_ca.make_root(root_signer, pki_ca.ca_name("Root", ORG), now=NOW, validity=dt.timedelta(days=3650))
    signer = ForeignSigner(generate_key(request.param))
    cert = pki_ca.make_intermediate(
        root_signer, root, signer.public_key, pki_ca.ca_name("Issuing", ORG), now=NOW, validity=dt.timedelta(days=365)
    )
    return signer, root, pki_ca.IssuingCA(name="operational", certificate=cert, signer=signer, chain=(cert, root))


def _leaf(ca: pki_ca.IssuingCA) -> x509.Certificate:
    return ca.issue(
        DEFAULT_PROFILES["operational"],
        generate_key(Algorithm.P256).public_key(),
        x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "dev-1")]),
        now=NOW,
        serial=x509.random_serial_number(),
    )


def test_certificates_verify(hierarchy: tuple[ForeignSigner, x509.Certificate, pki_ca.IssuingCA]) -> None:
    _signer, root, ca = hierarchy
    root.verify_directly_issued_by(root)
    ca.certificate.verify_directly_issued_by(root)
    leaf = _leaf(ca)
    leaf.verify_directly_issued_by(ca.certificate)
    assert leaf.signature_algorithm_oid == ca.certificate.signature_algorithm_oid


def test_crl_verifies(hierarchy: tuple[ForeignSigner, x509.Certificate, pki_ca.IssuingCA]) -> None:
    signer, _root, ca = hierarchy
    revoked = [x509.RevokedCertificateBuilder().serial_number(n).revocation_date(NOW).build() for n in range(1, 200)]
    builder = x509.CertificateRevocationListBuilder().issuer_name(ca.certificate.subject)
    builder = builder.last_update(NOW).next_update(NOW + dt.timedelta(days=1))
    for r in revoked:
        builder = builder.add_revoked_certificate(r)
    crl = signer.sign_crl(builder)
    assert crl.is_signature_valid(signer.public_key)  # type: ignore[arg-type]
    assert len(crl) == len(revoked)


def test_ocsp_response_verifies(hierarchy: tuple[ForeignSigner, x509.Certificate, pki_ca.IssuingCA]) -> None:
    signer, _root, ca = hierarchy
    leaf = _leaf(ca)
    req = ocsp.OCSPRequestBuilder().add_certificate(leaf, ca.certificate, hashes.SHA1())  # noqa: S303 -- RFC 5019 CertIDs are SHA-1
    req = req.add_extension(x509.OCSPNonce(b"0123456789abcdef"), critical=False)
    query = pki_ocsp.parse_request(req.build().public_bytes(serialization.Encoding.DER))
    responder = pki_ocsp.Responder(ca=ca, certificate=ca.certificate, signer=signer)
    der = pki_ocsp.build_response(
        responder,
        query,
        pki_ocsp.CertStatus("good"),
        this_update=NOW,
        next_update=NOW + dt.timedelta(hours=1),
        include_nonce=True,
    )
    response = ocsp.load_der_ocsp_response(der)
    assert response.responder_key_hash == x509.SubjectKeyIdentifier.from_public_key(signer.public_key).digest  # type: ignore[arg-type]
    assert response.certificates == [ca.certificate]
    assert response.serial_number == leaf.serial_number
    assert response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == b"0123456789abcdef"
    # the same check every relying party makes: the signature over tbsResponseData by the responder
    verify_bytes(signer.public_key, response.signature, response.tbs_response_bytes)


def test_a_signer_that_signs_something_else_is_caught() -> None:
    bad = ForeignSigner(generate_key(Algorithm.P256), wrong=True)
    name = pki_ca.ca_name("Root", ORG)
    with pytest.raises(BadSignatureError):
        pki_ca.make_root(bad, name, now=NOW, validity=dt.timedelta(days=1))
    builder = x509.CertificateRevocationListBuilder().issuer_name(name).last_update(NOW)
    with pytest.raises(BadSignatureError):
        bad.sign_crl(builder.next_update(NOW + dt.timedelta(days=1)))


def test_no_template_for_ed25519() -> None:
    with pytest.raises(ValueError, match="no external signing for ed25519"):
        signed_der.template_key(Algorithm.ED25519)
