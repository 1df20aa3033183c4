"""Parsing and checking CRMF ``CertReqMessages`` (RFC 4211), strictly; what km does with a request
it is given. The POP rules are in :mod:`iotdlm.pki.crmf`. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1_modules import rfc4211

from iotdlm import errors
from iotdlm.pki import pop as pop_policy
from iotdlm.pki.crmf.asn1 import (
    DER_NULL,
    ENVELOPE_ALG,
    ENVELOPE_SPKI,
    MAX_CERT_REQ_ID,
    MAX_CRMF_BYTES,
    PublicKey,
    name_from_der,
    oid_text,
    optional,
    pop_verify,
    public_key_from_asn1,
    read_tlv,
    tlv,
)
from iotdlm.pki.crmf.building import ra_verified_message_der
from iotdlm.pki.crmf.cmp import cmp_body_of
from iotdlm.pki.der import describe_der_problem


@dataclass(frozen=True)
class CrmfRequest:
    """One checked ``CertReqMsg``. A ``"signature"`` POP has been verified; ``"ra_verified"`` is only
    reported, never judged."""

    cert_req_id: int
    subject: x509.Name | None
    public_key: PublicKey
    pop: Literal["signature", "ra_verified"]
    der: bytes
    #: what the request asked for beyond subject and publicKey, which the CA does not take from it:
    #: template fields ("validity", "issuer"...), "controls", "regInfo"
    ignored_fields: tuple[str, ...] = ()
    #: the template's extensions, as cryptography reads them
    requested_extensions: tuple[x509.Extension[x509.ExtensionType], ...] = ()
    #: the template carried extensions that cryptography could not read
    unreadable_extensions: bool = False


def _decode_message(der: bytes, what: str) -> Any:
    try:
        message, rest = der_decoder.decode(der, asn1Spec=rfc4211.CertReqMsg())
    except Exception as exc:  # pyasn1 raises PyAsn1Error and, on hostile input, assorted builtins
        raise errors.BadRequestError(f"{what}: not a DER CertReqMsg", field=what) from exc
    if rest:  # pragma: no cover - the outer TLV walk already sized the slice exactly
        raise errors.BadRequestError(f"{what}: trailing bytes", field=what)
    subject = optional(message.getComponentByName("certReq").getComponentByName("certTemplate"), "subject")
    if subject is not None and len(subject.getComponent()) == 0:
        raise errors.BadRequestError(f"{what}: an empty subject is not supported", field=what)
    try:
        canonical = der_encoder.encode(message) == der
    except Exception as exc:
        raise errors.BadRequestError(f"{what}: not a valid CertReqMsg", field=what) from exc
    if not canonical:
        raise errors.BadRequestError(f"{what}: CertReqMsg is not in canonical DER form", field=what)
    return message


def _check_signature_pop(
    popo_signing_key: Any,
    *,
    public_key: PublicKey,
    has_subject: bool,
    cert_req_der: bytes,
    cert_req_id: int,
    what: str,
) -> None:
    if optional(popo_signing_key, "poposkInput") is not None:
        if has_subject:
            raise errors.BadRequestError(
                f"{what}: poposkInput must be absent when the template has subject and publicKey "
                "(RFC 4211 section 4.1)",
                field=what,
            )
        raise errors.UnsupportedError(f"{what}: POPOSigningKey with poposkInput is not supported", field=what)
    if not has_subject:
        raise errors.BadRequestError(
            f"{what}: signature POP without poposkInput needs a subject in the template (RFC 4211 section 4.1)",
            field=what,
        )
    algorithm = popo_signing_key.getComponentByName("algorithmIdentifier")
    alg_oid = oid_text(algorithm.getComponentByName("algorithm"))
    params = optional(algorithm, "parameters")
    params_der = None if params is None else bytes(params)
    try:  # the one policy PKCS#10 uses too (iotdlm.pki.pop)
        digest = pop_policy.check_pop_algorithm(public_key, alg_oid)
    except errors.BadSignatureError as exc:
        raise errors.BadSignatureError(f"certReqId {cert_req_id}: POP {exc.message}", field=what) from exc
    except errors.UnsupportedError as exc:
        raise errors.UnsupportedError(f"{what}: POP {exc.message}", field=what) from exc
    rsa_key = isinstance(public_key, rsa.RSAPublicKey)
    allowed_params: tuple[bytes | None, ...] = (None, DER_NULL) if rsa_key else (None,)
    if params_der not in allowed_params:
        raise errors.BadRequestError(
            f"{what}: unexpected parameters for {pop_policy.algorithm_name(alg_oid)}", field=what
        )
    bits = popo_signing_key.getComponentByName("signature")
    if len(bits) % 8 != 0:
        raise errors.BadSignatureError(
            f"certReqId {cert_req_id}: POP signature is not a whole number of bytes", field=what
        )
    signature: bytes = bits.asOctets()
    try:
        pop_verify(public_key, signature, cert_req_der, digest)
    except (InvalidSignature, ValueError) as exc:
        raise errors.BadSignatureError(
            f"certReqId {cert_req_id}: proof-of-possession signature does not verify", field=what
        ) from exc


def _fast_ra_verified(der: bytes, what: str) -> CrmfRequest | None:
    """The common case -- a canonical raVerified CertReqMsg as pm builds it -- without pyasn1.

    Accepted only if rebuilding the message from what was read gives back exactly these bytes;
    anything else (other POP, extra template fields, odd encodings, bad values) returns None and
    takes the full pyasn1 path, which decides and words the error.
    """
    try:
        end = len(der)
        tag, s_req, e_req = read_tlv(der, 0, end, what)  # CertReqMsg
        tag2, s_cr, e_cr = read_tlv(der, s_req, e_req, what)  # CertRequest
        tag3, s_id, e_id = read_tlv(der, s_cr, e_cr, what)  # certReqId
        tag4, s_t, e_t = read_tlv(der, e_id, e_cr, what)  # CertTemplate
        tag5, s_n, e_n = read_tlv(der, s_t, e_t, what)  # [5] Name
        if (tag, tag2, tag3, tag4, tag5) != (0x30, 0x30, 0x02, 0x30, 0xA5) or der[e_cr:] != b"\x80\x00":
            return None
        if e_id - s_id > 4 or der[e_n] != 0xA6:
            return None
        cert_req_id = int.from_bytes(der[s_id:e_id], "big")
        subject = name_from_der(der[s_n:e_n], what)
        public_key = serialization.load_der_public_key(b"\x30" + der[e_n + 1 : e_t])
        if not isinstance(public_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey):
            return None
        if ra_verified_message_der(cert_req_id, subject, public_key) != der:
            return None
    except (errors.IotdlmError, ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return CrmfRequest(cert_req_id=cert_req_id, subject=subject, public_key=public_key, pop="ra_verified", der=der)


def _parse_message(der: bytes, index: int) -> CrmfRequest:
    fast = _fast_ra_verified(der, f"certReqMessages[{index}]")
    return fast if fast is not None else _parse_message_asn1(der, index)


def _parse_message_asn1(der: bytes, index: int) -> CrmfRequest:
    what = f"certReqMessages[{index}]"
    message = _decode_message(der, what)
    request = message.getComponentByName("certReq")
    cert_req_id = int(request.getComponentByName("certReqId"))
    if not 0 <= cert_req_id <= MAX_CERT_REQ_ID:
        # Never format the value: str() of a 5000-digit int raises ValueError (int_max_str_digits).
        raise errors.BadRequestError(f"{what}: certReqId is outside 0..{MAX_CERT_REQ_ID}", field=what)
    template = request.getComponentByName("certTemplate")

    tagged_spki = optional(template, "publicKey")
    if tagged_spki is None:
        raise errors.BadRequestError(f"certReqId {cert_req_id}: template has no publicKey", field=what)
    public_key = public_key_from_asn1(tagged_spki, what)

    subject_choice = optional(template, "subject")
    subject = None
    if subject_choice is not None:
        subject = name_from_der(der_encoder.encode(subject_choice.getComponent()), what)

    ignored, extensions, unreadable = _template_extras(message, template)

    popo = optional(message, "popo")
    if popo is None:
        raise errors.BadRequestError(f"certReqId {cert_req_id}: no proof of possession", field=what)
    pop_kind = popo.getName()
    pop: Literal["signature", "ra_verified"]
    if pop_kind == "raVerified":
        pop = "ra_verified"
    elif pop_kind == "signature":
        # The certReq bytes as sent: the first TLV inside the (canonical) CertReqMsg.
        _, content_start, _ = read_tlv(der, 0, len(der), what)
        _, _, req_end = read_tlv(der, content_start, len(der), what)
        _check_signature_pop(
            popo.getComponent(),
            public_key=public_key,
            has_subject=subject is not None,
            cert_req_der=der[content_start:req_end],
            cert_req_id=cert_req_id,
            what=what,
        )
        pop = "signature"
    else:
        raise errors.UnsupportedError(
            f"certReqId {cert_req_id}: proof of possession {pop_kind} is not supported (raVerified and signature are)",
            field=what,
        )
    return CrmfRequest(
        cert_req_id=cert_req_id,
        subject=subject,
        public_key=public_key,
        pop=pop,
        der=der,
        ignored_fields=ignored,
        requested_extensions=extensions,
        unreadable_extensions=unreadable,
    )


_TEMPLATE_FIELDS: Final = ("version", "serialNumber", "signingAlg", "issuer", "validity", "issuerUID", "subjectUID")
_EXTENSION_REQUEST: Final = tlv(0x06, bytes.fromhex("2a864886f70d01090e"))  # PKCS#9 extensionRequest


def _template_extras(
    message: Any, template: Any
) -> tuple[tuple[str, ...], tuple[x509.Extension[x509.ExtensionType], ...], bool]:
    """(ignored field names, requested extensions, whether some were unreadable): what the requester
    asked for that the CA decides itself. Only read from what pyasn1 already decoded."""
    ignored = [name for name in _TEMPLATE_FIELDS if optional(template, name) is not None]
    validity = optional(template, "validity")
    if validity is not None and optional(validity, "notBefore") is None and optional(validity, "notAfter") is None:
        ignored.remove("validity")  # an empty OptionalValidity (OpenSSL sends one) asks for nothing
    if optional(message.getComponentByName("certReq"), "controls") is not None:
        ignored.append("controls")
    if optional(message, "regInfo") is not None:
        ignored.append("regInfo")
    tagged = optional(template, "extensions")
    if tagged is None:
        return tuple(ignored), (), False
    # [9] IMPLICIT Extensions -> Extensions, read by cryptography from a PKCS#10 envelope (as for Names)
    extensions_der = b"\x30" + bytes(der_encoder.encode(tagged))[1:]
    attribute = tlv(0x30, _EXTENSION_REQUEST + tlv(0x31, extensions_der))
    info = tlv(0x30, b"\x02\x01\x00\x30\x00" + ENVELOPE_SPKI + tlv(0xA0, attribute))
    envelope = tlv(0x30, info + ENVELOPE_ALG + b"\x03\x01\x00")
    try:
        return tuple(ignored), tuple(x509.load_der_x509_csr(envelope).extensions), False
    except Exception:  # cryptography raises assorted errors on hostile extensions: report, go on
        return tuple(ignored), (), True


def parse(der: bytes, *, max_bytes: int = MAX_CRMF_BYTES, max_messages: int = 1000) -> list[CrmfRequest]:
    """Parse CertReqMessages DER and check every message; one :class:`CrmfRequest` per message, in order.

    Signature POPs are verified (:class:`~iotdlm.errors.BadSignatureError` naming the certReqId);
    ``raVerified`` is reported as ``pop="ra_verified"`` and left to the caller's policy.

    Raises :class:`~iotdlm.errors.TooLargeError` over ``max_bytes`` / ``max_messages`` (checked before
    any ASN.1 decoding), :class:`~iotdlm.errors.BadRequestError` for anything malformed (not DER,
    trailing bytes, wrong structure, missing publicKey or POP, repeated certReqId) and
    :class:`~iotdlm.errors.UnsupportedError` for unsupported keys, signature algorithms and POP kinds
    (keyEncipherment, keyAgreement). Nothing else escapes for any input bytes.
    """
    if max_bytes < 1 or max_messages < 1:
        raise ValueError("max_bytes and max_messages must be positive")
    data = bytes(der)
    if len(data) > max_bytes:
        raise errors.TooLargeError(f"CertReqMessages is {len(data)} bytes, the limit is {max_bytes}")
    if not data:
        raise errors.BadRequestError("CertReqMessages is empty")
    what = "certReqMessages"
    try:
        tag, start, end = read_tlv(data, 0, len(data), what)
    except errors.BadRequestError:
        tag, start, end = -1, 0, 0
    if tag != 0x30 or end != len(data):
        raise errors.BadRequestError(f"CertReqMessages: {describe_der_problem(data, 'CertReqMessages')}", field=what)
    cmp_body = cmp_body_of(data)
    if cmp_body is not None:
        raise errors.BadRequestError(
            f"this is a CMP PKIMessage (RFC 4210, body {cmp_body}), not bare CertReqMessages: send the "
            "CertReqMessages inside it (`iotdlm ca issue --crmf` takes the whole CMP message and does that)",
            field=what,
        )

    slices: list[bytes] = []
    pos = start
    while pos < end:
        if len(slices) == max_messages:
            raise errors.TooLargeError(f"{what}: more than {max_messages} messages", field=what)
        item = f"{what}[{len(slices)}]"
        msg_tag, _, msg_end = read_tlv(data, pos, end, item)
        if msg_tag != 0x30:
            raise errors.BadRequestError(f"{item}: expected a SEQUENCE, got tag 0x{msg_tag:02x}", field=item)
        slices.append(data[pos:msg_end])
        pos = msg_end
    if not slices:
        raise errors.BadRequestError(f"{what}: no messages (SIZE (1..MAX))", field=what)

    requests: list[CrmfRequest] = []
    seen: set[int] = set()
    for index, message_der in enumerate(slices):
        request = _parse_message(message_der, index)
        if request.cert_req_id in seen:
            raise errors.BadRequestError(
                f"certReqId {request.cert_req_id} appears more than once", field=f"{what}[{index}]"
            )
        seen.add(request.cert_req_id)
        requests.append(request)
    return requests
