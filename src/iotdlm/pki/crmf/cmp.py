"""RFC 4210 CMP: telling a ``PKIMessage`` from bare CertReqMessages and taking the CertReqMessages out
of an ``ir`` / ``cr`` / ``kur`` (the CMP protection is not checked). Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from pyasn1.codec.der import decoder as der_decoder
from pyasn1_modules import rfc4210

from iotdlm import errors
from iotdlm.pki import pop as pop_policy
from iotdlm.pki.crmf.asn1 import (
    MAX_CRMF_BYTES,
    oid_text,
    optional,
    read_tlv,
)
from iotdlm.pki.der import describe_der_problem

_PKI_BODIES: Final[tuple[str, ...]] = tuple(str(nt.name) for nt in rfc4210.PKIBody().componentType.namedTypes)
_CMP_REQUEST_BODIES: Final = ("ir", "cr", "kur")
_PBM: Final = "1.2.840.113533.7.66.13"
_DHBM: Final = "1.2.840.113533.7.66.30"


@dataclass(frozen=True)
class CmpRequest:
    """The CertReqMessages taken out of an RFC 4210 PKIMessage. Its protection is NOT verified."""

    body: str  # ir | cr | kur
    cert_req_messages: bytes  # the DER exactly as it sat in the message (POP signatures still verify)
    protection: str | None  # what protected the message ("password-based MAC", an algorithm), None if none


def cmp_body_of(data: bytes) -> str | None:
    """The PKIBody name if ``data`` is shaped like a PKIMessage (SEQUENCE { SEQUENCE, [n] ... }), else None.

    Cheap (two TLV headers, no ASN.1 decoding); CertReqMessages never has a context tag at that place.
    """
    try:
        tag, start, end = read_tlv(data, 0, len(data), "m")
        if tag != 0x30:
            return None
        header_tag, _, header_end = read_tlv(data, start, end, "m")
        if header_tag != 0x30 or header_end >= end:
            return None
        body_tag = data[header_end]
    except errors.IotdlmError:
        return None
    if body_tag & 0xE0 != 0xA0 or (body_tag & 0x1F) >= len(_PKI_BODIES):
        return None
    return _PKI_BODIES[body_tag & 0x1F]


def looks_like_cmp(data: bytes) -> bool:
    """True if ``data`` is shaped like an RFC 4210 PKIMessage (see :func:`unwrap_cmp`)."""
    return cmp_body_of(bytes(data)) is not None


def _cmp_refusal(body: str) -> errors.RejectedError:
    if body == "p10cr":
        return errors.UnsupportedError(
            "this CMP message is a p10cr: it carries a PKCS#10 request, not CRMF; give that PKCS#10 request "
            "with --csr instead (`openssl cmp -cmd p10cr` reads it from its -csr file)",
            field="crmf",
        )
    if body == "ccr":
        return errors.UnsupportedError(
            "this CMP message is a ccr (cross-certification request); only device certificate requests "
            "(ir, cr, kur) are taken",
            field="crmf",
        )
    return errors.BadRequestError(
        f"this CMP message is a {body}, not a certificate request (ir, cr or kur)", field="crmf"
    )


def unwrap_cmp(data: bytes, *, max_bytes: int = MAX_CRMF_BYTES) -> CmpRequest:
    """Take the CertReqMessages out of an RFC 4210 PKIMessage whose body is ir, cr or kur.

    The message's protection (password-based MAC or signature) is **not** checked -- the CRMF proof of
    possession inside still is, by :func:`parse`. Other bodies are refused saying what they are (p10cr:
    use the PKCS#10 request itself). Raises only :mod:`iotdlm.errors` classes.
    """
    data = bytes(data)
    if len(data) > max_bytes:
        raise errors.TooLargeError(f"CMP message is {len(data)} bytes, the limit is {max_bytes}", field="crmf")
    body = cmp_body_of(data)
    if body is None:
        raise errors.BadRequestError(
            f"not a CMP PKIMessage: {describe_der_problem(data, 'CMP PKIMessage')}", field="crmf"
        )
    if body not in _CMP_REQUEST_BODIES:
        raise _cmp_refusal(body)
    try:
        message, rest = der_decoder.decode(data, asn1Spec=rfc4210.PKIMessage())
    except Exception as exc:  # pyasn1 raises PyAsn1Error and, on hostile input, assorted builtins
        raise errors.BadRequestError(
            f"CMP {body} message: {describe_der_problem(data, 'CMP PKIMessage')}", field="crmf"
        ) from exc
    if rest:
        raise errors.BadRequestError(f"CMP {body} message: {len(rest)} trailing bytes after the DER", field="crmf")
    # the body's bytes as sent: [n] EXPLICIT { CertReqMessages }
    _, start, end = read_tlv(data, 0, len(data), "PKIMessage")
    _, _, header_end = read_tlv(data, start, end, "PKIMessage.header")
    _, body_start, body_end = read_tlv(data, header_end, end, "PKIMessage.body")
    _, _, inner_end = read_tlv(data, body_start, body_end, "PKIMessage.body")
    if inner_end != body_end:
        raise errors.BadRequestError(f"CMP {body} message: the body holds more than its CertReqMessages", field="crmf")
    protection: str | None = None
    if optional(message, "protection") is not None:
        alg = optional(message.getComponentByName("header"), "protectionAlg")
        oid = "?" if alg is None else oid_text(alg.getComponentByName("algorithm"))
        protection = {_PBM: "password-based MAC", _DHBM: "Diffie-Hellman based MAC"}.get(
            oid, pop_policy.algorithm_name(oid)
        )
    return CmpRequest(body=body, cert_req_messages=data[body_start:body_end], protection=protection)
