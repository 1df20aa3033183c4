"""The transfer's device routes over CoAP (issue 17, ADR 0029): the payloads cm's CoAP door and a
constrained device exchange for the fallback and refusal reports, the attestation and the update.

A request to a transfer resource is one CBOR array (Content-Format 60, application/cbor)::

    [certificate format (287 DER or C509), certificate (bstr), body (bstr)]

the certificate being the one whose key ran EDHOC (cm checks it, km decides, as for the TLS client
certificate over HTTPS), the body what the HTTPS route takes (the same JSON reports, the COSE
evidence; empty for the challenge and the update). The update answer is a CBOR array
``[transfer id, version, SHA-256 hex, image]`` (the HTTPS route's headers and body); the other
answers are the HTTPS routes' JSON (Content-Format 50).
"""

from __future__ import annotations

from dataclasses import dataclass

import cbor2

from iotdlm.errors import BadRequestError, TooLargeError
from iotdlm.wire import coap_est as est

CBOR = 60
JSON = 50
FALLBACK = ("transfer", "fallback")
REFUSAL = ("transfer", "refusal")
CHALLENGE = ("transfer", "attestation", "challenge")
EVIDENCE = ("transfer", "attestation", "evidence")
UPDATE = ("transfer", "update")
UPDATE_REPORT = ("transfer", "update", "report")
#: a transfer request's body at most (the evidence, 16 KiB over HTTPS, is the largest)
MAX_BODY = 16 * 1024
#: the update image a constrained device takes at most (km serves at most 256 KiB through cm)
MAX_IMAGE = 256 * 1024


@dataclass(frozen=True)
class TransferRequest:
    certificate: bytes  # DER
    body: bytes


@dataclass(frozen=True)
class UpdateAnswer:
    transfer: str
    version: str
    sha256: str
    image: bytes


def encode_request(certificate_der: bytes, fmt: int, body: bytes = b"") -> bytes:
    return cbor2.dumps([fmt, est.encode_certificate(certificate_der, fmt), body])


def decode_request(payload: bytes, max_body: int = MAX_BODY) -> TransferRequest:
    """The certificate (as DER, checked to parse) and body of a transfer request, or a RejectedError."""
    if len(payload) > est.MAX_CERT_BYTES + max_body + 16:
        raise TooLargeError(f"the transfer request exceeds {est.MAX_CERT_BYTES + max_body + 16} bytes")
    data = _loads(payload, "the transfer request is not CBOR: send [certificate format, certificate, body]")
    if not isinstance(data, list) or len(data) != 3:
        raise BadRequestError("the transfer request must be [certificate format, certificate, body]")
    fmt, cert, body = data
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt not in est.CERT_FORMATS:
        raise BadRequestError(f"the certificate format must be {est.PKIX_CERT} (DER) or {est.C509_CERT} (C509)")
    if not isinstance(cert, bytes) or not isinstance(body, bytes):
        raise BadRequestError("the transfer request's certificate and body must be byte strings")
    if len(body) > max_body:
        raise TooLargeError(f"the transfer request's body exceeds {max_body} bytes")
    return TransferRequest(est.decode_certificate(cert, fmt, "the certificate sent"), body)


def encode_update(answer: UpdateAnswer) -> bytes:
    return cbor2.dumps([answer.transfer, answer.version, answer.sha256, answer.image])


def decode_update(payload: bytes) -> UpdateAnswer:
    """The update answer, or a RejectedError (the image is checked against the SHA-256 by the caller)."""
    if len(payload) > MAX_IMAGE + 256:
        raise TooLargeError(f"the update exceeds {MAX_IMAGE} bytes")
    data = _loads(payload, "the update answer is not CBOR")
    if not isinstance(data, list) or len(data) != 4:
        raise BadRequestError("the update answer must be [transfer, version, sha256, image]")
    tid, version, sha, image = data
    if not all(isinstance(x, str) and 0 < len(x) <= 128 for x in (tid, version, sha)) or not isinstance(image, bytes):
        raise BadRequestError("the update answer must be [transfer, version, sha256, image] (texts and bytes)")
    return UpdateAnswer(tid, version, sha, image)


def _loads(payload: bytes, what: str) -> object:
    try:
        return cbor2.loads(payload)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        raise BadRequestError(what) from exc
    except RuntimeError as exc:  # cbor2's objects (a tag hashed) raise it: a shape error like the others
        raise BadRequestError(what) from exc


__all__ = [
    "CBOR",
    "CHALLENGE",
    "EVIDENCE",
    "FALLBACK",
    "JSON",
    "REFUSAL",
    "UPDATE",
    "UPDATE_REPORT",
    "TransferRequest",
    "UpdateAnswer",
    "decode_request",
    "decode_update",
    "encode_request",
    "encode_update",
]
