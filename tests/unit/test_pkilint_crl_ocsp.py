"""pkilint (RFC 5280 CRL and RFC 6960 OCSP response linters) over everything the VA emits: full,
delta and root CRLs, and OCSP responses good / revoked (by reason, and superseded after its
grace) / unknown plus the error responses malformedRequest / internalError / unauthorized, for
each CA key algorithm. No ERROR or FATAL finding is allowed except the false positives listed
in :data:`ALLOWED` with the RFC text that allows the value (none today)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from pkilint import loader, pkix
from pkilint.pkix import crl as pkilint_crl
from pkilint.pkix import extension, name
from pkilint.pkix import ocsp as pkilint_ocsp
from pkilint.validation import ValidationFindingSeverity

from iotdlm.errors import UnavailableError
from iotdlm.km.va import ROOT
from iotdlm.pki import crl as pki_crl
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.pki.profiles import DEFAULT_PROFILES
from tests.va_pki import URLS, World, make_world

#: (finding code, why it is a false positive: the RFC text that allows what we emit)
ALLOWED: dict[str, str] = {}

_BAD = {ValidationFindingSeverity.ERROR, ValidationFindingSeverity.FATAL}


def _decoders() -> list[object]:
    return [
        pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
        pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
    ]


def crl_findings(der: bytes) -> list[str]:
    """ERROR/FATAL findings of pkilint's PKIX CRL profile (as ``lint_crl lint -p PKIX``; the
    ``-t CRL|ARL`` type only matters to the CA/B Forum profile, so the root's CRL gets the same)."""
    validator = pkilint_crl.create_pkix_crl_validator_container(
        _decoders(),
        [
            pkilint_crl.create_issuer_validator_container([]),
            pkilint_crl.create_validity_validator_container([]),
            pkilint_crl.create_extensions_validator_container([]),
        ],
    )
    doc = loader.RFC5280CertificateListDocumentLoader().load_der_document(der, "crl")
    return _bad(validator.validate(doc.root))


def ocsp_findings(der: bytes) -> list[str]:
    """ERROR/FATAL findings of pkilint's RFC 6960 OCSP response linter (as ``lint_ocsp_response``)."""
    validator = pkilint_ocsp.create_pkix_ocsp_response_validator_container(
        [pkilint_ocsp.create_response_decoder(), *_decoders()], []
    )
    doc = loader.RFC6960OCSPResponseDocumentLoader().load_der_document(der, "ocsp")
    return _bad(validator.validate(doc.root))


def _bad(results: object) -> list[str]:
    out = []
    for result in results:  # type: ignore[attr-defined]
        for fd in result.finding_descriptions:
            if fd.finding.severity in _BAD and fd.finding.code not in ALLOWED:
                out.append(f"{fd.finding.code} ({fd.finding.severity}) at {result.node.path}: {fd.message}")
    return out


@dataclass
class Emitted:
    crls: dict[str, bytes]
    ocsp: dict[str, bytes]


def _emit(world: World) -> Emitted:
    va, clock = world.va, world.clock
    good = world.issue(device_id="dev-good")
    revoked = world.issue(device_id="dev-revoked")
    plain = world.issue(device_id="dev-plain")
    superseded = world.issue(device_id="dev-old")
    never_asked = world.issue(device_id="dev-never-asked")  # the VA keeps status rows it has read
    va.revoke(revoked.serial_number, issuer="operational", reason="keyCompromise", actor="test")
    va.revoke(plain.serial_number, issuer="operational", reason=None, actor="test")
    world.store.update_certificate_status(
        "operational", superseded.serial_number, status="superseded", at=clock.now(), superseded_by=good.serial_number
    )
    clock.advance(va.settings.superseded_grace + dt.timedelta(seconds=1))
    crls: dict[str, bytes] = {}
    for cert, what in ((revoked, "revoked"), (plain, "plain"), (superseded, "superseded")):
        part = cert.serial_number % URLS.crl_partitions
        crls[f"full {what}"] = va.generate_crl("operational", part).der
        assert cert.serial_number in {e.serial_number for e in x509.load_der_x509_crl(crls[f"full {what}"])}
    late = world.issue(device_id="dev-late")
    va.revoke(late.serial_number, issuer="operational", reason="cessationOfOperation", actor="test")
    crls["delta"] = va.current_crl("operational", late.serial_number % URLS.crl_partitions, delta=True).der
    crls["empty full"] = va.generate_crl("factory", 0).der
    crls["empty delta"] = va.generate_crl("factory", 0, delta=True).der
    crls["root, empty"] = va.generate_crl(ROOT, 0).der
    va.revoke_ca("factory", reason="cACompromise", actor="test")
    crls["root"] = va.current_crl(ROOT, 0).der
    assert len(x509.load_der_x509_crl(crls["root"])) == 1

    answers: dict[str, bytes] = {}
    for cert, what in ((good, "good"), (revoked, "revoked"), (plain, "revoked, no reason"), (superseded, "superseded")):
        answers[f"{what}, nonce"] = va.ocsp(world.ocsp_request(cert, nonce=True))
        answers[f"{what}, cached"] = va.ocsp(world.ocsp_request(cert, nonce=False))
    answers["good, cache hit"] = va.ocsp(world.ocsp_request(good, nonce=False))
    answers["unknown"] = va.ocsp(world.ocsp_request(_never_recorded(world), nonce=True))
    answers["malformedRequest"] = va.ocsp(b"\x30\x03\x02\x01\x01")
    answers["unauthorized"] = va.ocsp(world.ocsp_request(good, nonce=True, issuer="factory"))
    original = world.store.certificate_status

    def down(*_a: object) -> object:
        raise UnavailableError("database unreachable")

    world.store.certificate_status = down  # type: ignore[method-assign,assignment]
    try:
        answers["internalError"] = va.ocsp(world.ocsp_request(never_asked, nonce=True))
    finally:
        world.store.certificate_status = original  # type: ignore[method-assign]
    expected = {
        "unknown": ocsp.OCSPResponseStatus.SUCCESSFUL,
        "malformedRequest": ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
        "unauthorized": ocsp.OCSPResponseStatus.UNAUTHORIZED,
        "internalError": ocsp.OCSPResponseStatus.INTERNAL_ERROR,
    }
    for what, status in expected.items():
        assert ocsp.load_der_ocsp_response(answers[what]).response_status == status, what
    assert ocsp.load_der_ocsp_response(answers["unknown"]).certificate_status == ocsp.OCSPCertStatus.UNKNOWN
    sup = ocsp.load_der_ocsp_response(answers["superseded, nonce"])
    assert sup.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert sup.revocation_reason == x509.ReasonFlags.superseded
    return Emitted(crls=crls, ocsp=answers)


def _never_recorded(world: World) -> x509.Certificate:
    """A certificate of the operational CA that the store has never seen (OCSP: unknown)."""
    ca = world.pki.cas["operational"]
    return ca.issue(
        DEFAULT_PROFILES["operational"],
        generate_key(Algorithm.P256).public_key(),
        x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "never recorded")]),
        now=world.clock.now(),
        serial=x509.random_serial_number(),
    )


@pytest.fixture(scope="module", params=list(Algorithm), ids=str)
def emitted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emitted]:
    world = make_world(tmp_path_factory.mktemp("pkilint"), request.param)
    try:
        yield _emit(world)
    finally:
        world.store.close()


_CRLS = ["full revoked", "full plain", "full superseded", "delta", "empty full", "empty delta", "root, empty", "root"]
_OCSP = [
    "good, nonce",
    "good, cached",
    "good, cache hit",
    "revoked, nonce",
    "revoked, cached",
    "revoked, no reason, nonce",
    "revoked, no reason, cached",
    "superseded, nonce",
    "superseded, cached",
    "unknown",
    "malformedRequest",
    "unauthorized",
    "internalError",
]


@pytest.mark.parametrize("what", _CRLS)
def test_pkilint_finds_no_error_in_our_crls(emitted: Emitted, what: str) -> None:
    assert crl_findings(emitted.crls[what]) == []


@pytest.mark.parametrize("what", _OCSP)
def test_pkilint_finds_no_error_in_our_ocsp_responses(emitted: Emitted, what: str) -> None:
    assert ocsp_findings(emitted.ocsp[what]) == []


def test_the_linters_do_find_errors(tmp_path: Path) -> None:
    """The lint above can fail: a CRL without cRLNumber and AKI, and a truncated OCSP response."""
    world = make_world(tmp_path)
    try:
        ca = world.pki.cas["operational"]
        now = world.clock.now()
        bare = ca.signer.sign_crl(
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca.certificate.subject)
            .last_update(now)
            .next_update(now + dt.timedelta(days=1))
        )
        found = crl_findings(bare.public_bytes(Encoding.DER))
        assert any("crl_number_missing" in f for f in found), found
        assert any("authority_key_identifier_missing" in f for f in found), found
        # a revoked entry with removeFromCRL in a full CRL is what RFC 5280 5.3.1 forbids; we refuse
        # to build it
        with pytest.raises(ValueError, match="removeFromCRL"):
            pki_crl.build_crl(
                ca,
                [pki_crl.RevokedEntry(5, now, "removeFromCRL")],
                number=1,
                this_update=now,
                next_update=now + dt.timedelta(days=1),
                partition=0,
                urls=URLS,
            )
    finally:
        world.store.close()
