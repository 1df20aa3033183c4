"""The console shows what km's OCSP responder says only when the answer is signed by the
certificate's CA (or a responder certificate that CA made for OCSP) and speaks of that certificate."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import ocsp

from iotdlm.console.backend import verify_ocsp_answer
from iotdlm.errors import RejectedError
from iotdlm.pki.keys import hash_for
from tests.helpers import NOW, make_pki

PKI = make_pki()
OTHER = make_pki()
CA = PKI.cas["service"]
LEAF = PKI.module("pm", "board-a").cert
SIBLING = PKI.module("sm").cert


def _answer(
    about: x509.Certificate, *, by: tuple[object, x509.Certificate] | None = None, include: bool = False
) -> ocsp.OCSPResponse:
    """An OCSP answer about ``about``, signed by ``by`` (key, its certificate; default: the CA),
    which is included in the answer when ``include``."""
    key, named = by if by is not None else (CA.signer.private_key, CA.certificate)  # type: ignore[attr-defined]
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=about, issuer=CA.certificate, algorithm=hashes.SHA256(), cert_status=ocsp.OCSPCertStatus.GOOD,
            this_update=NOW, next_update=NOW + dt.timedelta(hours=1), revocation_time=None, revocation_reason=None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, named)
    )  # fmt: skip
    if include:
        builder = builder.certificates([named])
    return builder.sign(key, hash_for(key))  # type: ignore[arg-type]


KM, FOREIGN_KM, FOREIGN_CA = PKI.module("km"), OTHER.module("km"), OTHER.cas["service"]


def test_an_answer_signed_by_the_ca_is_shown() -> None:
    verify_ocsp_answer(_answer(LEAF), LEAF, CA.certificate, NOW)


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (lambda: _answer(SIBLING), "another certificate"),
        (lambda: _answer(LEAF, by=(FOREIGN_CA.signer.private_key, FOREIGN_CA.certificate)), "does not verify"),  # type: ignore[attr-defined]
        (lambda: _answer(LEAF, by=(KM.key, KM.cert), include=True), "extended key usage"),
        (lambda: _answer(LEAF, by=(FOREIGN_KM.key, FOREIGN_KM.cert), include=True), "not issued by|bad signature"),
    ],
    ids=["about-another-certificate", "signed-by-another-ca", "module-not-an-ocsp-responder", "foreign-responder"],
)
def test_an_answer_that_does_not_verify_is_not_shown(answer: object, why: str) -> None:
    with pytest.raises(RejectedError, match=why):
        verify_ocsp_answer(answer(), LEAF, CA.certificate, NOW)  # type: ignore[operator]
