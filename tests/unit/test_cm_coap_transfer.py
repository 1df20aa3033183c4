"""cm's CoAP transfer routes (:mod:`iotdlm.cm.coap_transfer`) before km: the mode check, the
Content-Format, the envelope and the EDHOC-key binding refuse before anything reaches km."""

from __future__ import annotations

from collections.abc import Set
from types import SimpleNamespace
from typing import Any

import aiocoap
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from iotdlm.clock import SystemClock
from iotdlm.cm.coap import EdhocPeer, OscoreRequiredError, WrongContentFormatError
from iotdlm.cm.coap_transfer import CoapTransferRoutes
from iotdlm.errors import BadRequestError, ModeError, UntrustedError
from iotdlm.wire import coap_est as est
from iotdlm.wire import coap_transfer as wire
from tests.unit.test_coap_wire import RFC7925_DER


class NoKm:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"km was asked ({name}) for a request cm must refuse")


def _routes(allowed: bool = True) -> CoapTransferRoutes:
    def require(modes: Set[str], what: str) -> None:
        if not allowed:
            raise ModeError(f"{what} is not allowed in this mode")

    return CoapTransferRoutes(NoKm(), require, SystemClock())  # type: ignore[arg-type]


def _request(payload: bytes, key: ec.EllipticCurvePublicKey | None, fmt: int = wire.CBOR) -> aiocoap.Message:
    m = aiocoap.Message(code=aiocoap.POST, payload=payload, content_format=fmt)
    claims = [EdhocPeer(key, "")] if key is not None else []
    m.remote = SimpleNamespace(authenticated_claims=claims)
    return m


CERT_KEY = x509.load_der_x509_certificate(RFC7925_DER).public_key()


async def test_refusals_before_km() -> None:
    assert isinstance(CERT_KEY, ec.EllipticCurvePublicKey)
    body = wire.encode_request(RFC7925_DER, est.PKIX_CERT, b'{"transfer": "ab", "reason": "x"}')
    with pytest.raises(OscoreRequiredError):
        await _routes().fallback(_request(body, None))
    with pytest.raises(ModeError, match="reporting a fallback over CoAP"):
        await _routes(allowed=False).fallback(_request(body, CERT_KEY))
    with pytest.raises(WrongContentFormatError):
        await _routes().update(_request(body, CERT_KEY, fmt=wire.JSON))
    with pytest.raises(BadRequestError, match="certificate format, certificate, body"):
        await _routes().challenge(_request(b"\x80", CERT_KEY))
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(UntrustedError, match="not for the key that ran EDHOC"):
        await _routes().evidence(_request(body, other))
    with pytest.raises(BadRequestError, match="must be exactly"):  # the HTTPS route's parser
        await _routes().update_report(_request(body, CERT_KEY))
    with pytest.raises(BadRequestError, match="evidence is empty"):
        await _routes().evidence(_request(wire.encode_request(RFC7925_DER, est.PKIX_CERT), CERT_KEY))
