"""CRMF (RFC 4211) ``CertReqMessages``: built by pm, parsed and checked by km.

Two kinds of proof of possession (POP) are produced and accepted:

- ``raVerified`` (``ProofOfPossession [0] NULL``): pm builds the request for a device that only handed
  over its public key out of band. *Whether* ``raVerified`` is acceptable is the caller's policy (km
  accepts it only inside a request signed by pm); :func:`parse` only reports it.
- ``signature`` (``POPOSigningKey [1]``) with ``poposkInput`` absent: the signature is over the DER of
  ``CertReqMsg.certReq`` (the ASN.1 comment of RFC 4211 section 4.1; the prose there says "certificate
  template", but OpenSSL signs ``certReq`` too, see the OpenSSL-made vectors in the tests). RFC 4211
  only allows this form when the template holds both ``subject`` and ``publicKey``, so that is required.

Supported keys and the POP signature algorithms accepted with each are one policy shared with PKCS#10:
:mod:`iotdlm.pki.pop` (any SHA-2 digest with EC and RSA keys; pure Ed25519). Our own builders sign
with SHA-384 for P-384 and SHA-256 otherwise.

:func:`parse` is strict: canonical DER only (every message is re-encoded and compared byte for byte),
no trailing bytes, sizes bounded before any ASN.1 decoding, and only :mod:`iotdlm.errors` classes
escape for any input. Template fields other than ``subject`` and ``publicKey`` (validity, extensions,
controls, regInfo...) are accepted and not used: the CA fills certificates from its own profile.
:class:`CrmfRequest` names them (``ignored_fields``, ``requested_extensions``) so km can tell the
requester what it dropped, and :attr:`CrmfRequest.der` keeps the whole message.

An RFC 4210 CMP ``PKIMessage`` is not CertReqMessages: :func:`parse` says so, and
:func:`unwrap_cmp` takes the CertReqMessages out of an ``ir`` / ``cr`` / ``kur`` (without checking the
CMP protection; the POP inside is checked as always).

This module is pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import univ
from pyasn1_modules import rfc3280, rfc4210, rfc4211

from iotdlm import errors
from iotdlm.pki import pop as pop_policy
from iotdlm.pki.der import describe_der_problem

__all__ = [
    "MAX_CRMF_BYTES",
    "CmpRequest",
    "CrmfRequest",
    "PrivateKey",
    "PublicKey",
    "build_ra_verified",
    "build_ra_verified_many",
    "build_signed",
    "looks_like_cmp",
    "parse",
    "unwrap_cmp",
]

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey

MAX_CRMF_BYTES: Final = 64 * 1024
"""Default upper bound on the size of a DER ``CertReqMessages`` given to :func:`parse`."""

_MAX_CERT_REQ_ID: Final = 2**31 - 1
_DER_NULL: Final = b"\x05\x00"


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


# --------------------------------------------------------------------------------------------- keys


def _key_label(key: object, field: str = "publicKey") -> str:
    """The key's label if :mod:`iotdlm.pki.pop` certifies it, else UnsupportedError naming ``field``."""
    try:
        return pop_policy.check_request_key(key)
    except errors.UnsupportedError as exc:
        raise errors.UnsupportedError(exc.message, field=field) from exc


def _sign(private_key: PrivateKey, data: bytes) -> tuple[str, bytes | None, bytes]:
    """(signature algorithm OID, DER parameters or None, signature) over ``data``."""
    public_key = private_key.public_key()
    _key_label(public_key)
    alg = pop_policy.preferred_algorithm(public_key)
    digest = pop_policy.check_pop_algorithm(public_key, alg)
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        assert digest is not None
        return alg, None, private_key.sign(data, ec.ECDSA(digest))
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return alg, None, private_key.sign(data)
    assert digest is not None
    return alg, _DER_NULL, private_key.sign(data, padding.PKCS1v15(), digest)


def _verify(public_key: PublicKey, signature: bytes, data: bytes, digest: hashes.HashAlgorithm | None) -> None:
    """Raise InvalidSignature unless ``signature`` is good; ``digest`` came from the POP policy."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        assert digest is not None
        public_key.verify(signature, data, ec.ECDSA(digest))
    elif isinstance(public_key, ed25519.Ed25519PublicKey):
        public_key.verify(signature, data)
    else:
        assert digest is not None
        public_key.verify(signature, data, padding.PKCS1v15(), digest)


# ------------------------------------------------------------------------------------ DER helpers


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(content)) + content


def _read_tlv(buf: bytes, pos: int, end: int, what: str) -> tuple[int, int, int]:
    """(tag byte, content start, content end) of the TLV at ``pos``, which must fit before ``end``.

    Strict DER lengths: definite, minimal. Only used on the outer layers, so the high-tag-number form
    (never valid there) is refused too.
    """
    if end - pos < 2:
        raise errors.BadRequestError(f"{what}: truncated DER", field=what)
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise errors.BadRequestError(f"{what}: unexpected high tag number", field=what)
    first = buf[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise errors.BadRequestError(f"{what}: indefinite length is not DER", field=what)
    else:
        n = first & 0x7F
        if n > 4 or end - pos < n:
            raise errors.BadRequestError(f"{what}: bad DER length", field=what)
        length = int.from_bytes(buf[pos : pos + n], "big")
        if buf[pos] == 0 or length < 0x80:
            raise errors.BadRequestError(f"{what}: non-minimal DER length", field=what)
        pos += n
    if end - pos < length:
        raise errors.BadRequestError(f"{what}: truncated DER", field=what)
    return tag, pos, pos + length


# ------------------------------------------------------------------------ names and public keys


def _name_to_asn1(subject: x509.Name) -> Any:
    """cryptography Name -> pyasn1 rfc3280.RDNSequence (the value of the Name CHOICE)."""
    name, rest = der_decoder.decode(subject.public_bytes(), asn1Spec=rfc3280.Name())
    if rest:  # pragma: no cover - cryptography always emits exactly one Name
        raise ValueError("trailing bytes after Name")
    return name.getComponentByName("rdnSequence")


# cryptography has no public loader for a bare DER Name, but its PKCS#10 loader parses one without
# checking any signature. Wrapping the Name in
# CertificationRequest { info { 0, Name, SPKI, [0] {} }, id-Ed25519, '' } and reading ``.subject`` gives
# cryptography's own strict string parsing and keeps every attribute's string type.
_ENVELOPE_ALG: Final = _tlv(0x30, bytes.fromhex("06032b6570"))  # id-Ed25519
_ENVELOPE_SPKI: Final = _tlv(0x30, _ENVELOPE_ALG + _tlv(0x03, b"\x00" + bytes(32)))
_ENVELOPE_TAIL: Final = _ENVELOPE_SPKI + b"\xa0\x00"


def _name_from_der(name_der: bytes, what: str) -> x509.Name:
    info = _tlv(0x30, b"\x02\x01\x00" + name_der + _ENVELOPE_TAIL)
    envelope = _tlv(0x30, info + _ENVELOPE_ALG + b"\x03\x01\x00")
    try:
        name = x509.load_der_x509_csr(envelope).subject
    except (ValueError, TypeError) as exc:  # TypeError: a BIT STRING value under any OID but x500UniqueIdentifier
        raise errors.BadRequestError(
            f"{what}: subject is not a valid X.501 Name (an attribute value of the wrong type or encoding)", field=what
        ) from exc
    for attr in name:
        if isinstance(attr.value, str):
            try:  # the public constructor enforces the RFC 5280 length bounds the parser only warns about
                x509.NameAttribute(attr.oid, attr.value)
            except ValueError as exc:
                raise errors.BadRequestError(f"{what}: subject {attr.oid.dotted_string}: {exc}", field=what) from exc
    if name.public_bytes() != name_der:
        raise errors.BadRequestError(f"{what}: subject does not re-encode identically", field=what)
    return name


def _spki_to_asn1(public_key: PublicKey, target: Any) -> None:
    """Fill ``target`` (the implicitly tagged [6] SubjectPublicKeyInfo) from a cryptography key."""
    spki_der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    spki, rest = der_decoder.decode(spki_der, asn1Spec=rfc3280.SubjectPublicKeyInfo())
    if rest:  # pragma: no cover - cryptography always emits exactly one SPKI
        raise ValueError("trailing bytes after SubjectPublicKeyInfo")
    target.setComponentByName("algorithm", spki.getComponentByName("algorithm"))
    target.setComponentByName("subjectPublicKey", spki.getComponentByName("subjectPublicKey"))


def _public_key_from_asn1(tagged_spki: Any, what: str) -> PublicKey:
    # [6] IMPLICIT SubjectPublicKeyInfo: copy into an untagged SPKI to get the DER cryptography loads.
    spki = rfc3280.SubjectPublicKeyInfo()
    spki.setComponentByName("algorithm", tagged_spki.getComponentByName("algorithm"))
    spki.setComponentByName("subjectPublicKey", tagged_spki.getComponentByName("subjectPublicKey"))
    spki_der: bytes = der_encoder.encode(spki)
    try:
        key = serialization.load_der_public_key(spki_der)
    except UnsupportedAlgorithm as exc:
        alg = _oid_text(tagged_spki.getComponentByName("algorithm").getComponentByName("algorithm"))
        raise errors.UnsupportedError(f"{what}: public key algorithm {alg} is not supported", field=what) from exc
    except ValueError as exc:
        raise errors.BadRequestError(
            f"{what}: publicKey is not a valid key (bad encoding, or a point not on its curve)", field=what
        ) from exc
    try:
        pop_policy.check_request_key(key)
    except errors.UnsupportedError as exc:
        raise errors.UnsupportedError(f"{what}: {exc.message}", field=what) from exc
    assert isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey)
    return key


# ------------------------------------------------------------------------------------------ build


def _check_cert_req_id(cert_req_id: int) -> None:
    if isinstance(cert_req_id, bool) or not isinstance(cert_req_id, int):
        raise TypeError("cert_req_id must be an int")
    if not 0 <= cert_req_id <= _MAX_CERT_REQ_ID:
        raise ValueError(f"cert_req_id must be in 0..{_MAX_CERT_REQ_ID}, got {cert_req_id}")


def _cert_request(cert_req_id: int, subject: x509.Name, public_key: PublicKey) -> Any:
    _check_cert_req_id(cert_req_id)
    if not isinstance(subject, x509.Name):
        raise TypeError("subject must be a cryptography x509.Name")
    if len(subject.rdns) == 0:
        # pyasn1 silently drops an OPTIONAL empty SEQUENCE OF, so an empty Name would vanish.
        raise ValueError("subject must have at least one RDN")
    _key_label(public_key)
    template = rfc4211.CertTemplate()
    # subject [5] Name: Name is a CHOICE, so the tag is EXPLICIT (A5 .. 30 ..) even in an IMPLICIT module.
    template.getComponentByName("subject").setComponentByName("rdnSequence", _name_to_asn1(subject))
    # publicKey [6] SubjectPublicKeyInfo: IMPLICIT, so A6 { 30 AlgorithmIdentifier, 03 BIT STRING }.
    _spki_to_asn1(public_key, template.getComponentByName("publicKey"))
    request = rfc4211.CertRequest()
    request.setComponentByName("certReqId", cert_req_id)
    request.setComponentByName("certTemplate", template)
    return request


def _encode_messages(messages: Sequence[Any]) -> bytes:
    out = rfc4211.CertReqMessages()
    for message in messages:
        out.append(message)
    der: bytes = der_encoder.encode(out)
    return der


def _ra_verified_message(cert_req_id: int, subject: x509.Name, public_key: PublicKey) -> Any:
    message = rfc4211.CertReqMsg()
    message.setComponentByName("certReq", _cert_request(cert_req_id, subject, public_key))
    message.getComponentByName("popo").setComponentByName("raVerified", "")
    return message


def _ra_verified_message_der(cert_req_id: int, subject: x509.Name, public_key: PublicKey) -> bytes:
    """DER of one raVerified CertReqMsg, written directly: byte-identical to encoding
    :func:`_ra_verified_message` with pyasn1 (a test holds the two together), ~50x faster.

    CertReqMsg { CertRequest { certReqId INTEGER, CertTemplate { subject [5] EXPLICIT Name,
    publicKey [6] IMPLICIT SubjectPublicKeyInfo } }, popo raVerified [0] NULL }
    """
    _check_cert_req_id(cert_req_id)
    if not isinstance(subject, x509.Name):
        raise TypeError("subject must be a cryptography x509.Name")
    if len(subject.rdns) == 0:
        raise ValueError("subject must have at least one RDN")
    _key_label(public_key)
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    cert_req_id_der = _tlv(0x02, cert_req_id.to_bytes(max(1, (cert_req_id.bit_length() + 8) // 8), "big"))
    # [6] IMPLICIT replaces the SEQUENCE tag of the SPKI and keeps its length and content
    template = _tlv(0x30, _tlv(0xA5, subject.public_bytes()) + b"\xa6" + spki[1:])
    return _tlv(0x30, _tlv(0x30, cert_req_id_der + template) + b"\x80\x00")


def build_ra_verified(cert_req_id: int, subject: x509.Name, public_key: PublicKey) -> bytes:
    """DER of CertReqMessages with ONE CertReqMsg, popo = raVerified."""
    return _tlv(0x30, _ra_verified_message_der(cert_req_id, subject, public_key))


def build_ra_verified_many(items: Sequence[tuple[int, x509.Name, PublicKey]]) -> bytes:
    """DER of CertReqMessages with one raVerified CertReqMsg per item, in order.

    ``ValueError`` when ``items`` is empty (CertReqMessages is SIZE (1..MAX)) or repeats a certReqId.
    """
    if len(items) == 0:
        raise ValueError("CertReqMessages needs at least one request")
    ids = [cert_req_id for cert_req_id, _, _ in items]
    if len(set(ids)) != len(ids):
        raise ValueError("certReqId values must be unique within one CertReqMessages")
    return _tlv(0x30, b"".join(_ra_verified_message_der(i, s, k) for i, s, k in items))


def build_signed(cert_req_id: int, subject: x509.Name, private_key: PrivateKey) -> bytes:
    """DER of CertReqMessages with ONE CertReqMsg, popo = signature (POPOSigningKey over DER(certReq))."""
    request = _cert_request(cert_req_id, subject, private_key.public_key())
    alg_oid, params, signature = _sign(private_key, der_encoder.encode(request))
    message = rfc4211.CertReqMsg()
    message.setComponentByName("certReq", request)
    popo_signing_key = message.getComponentByName("popo").getComponentByName("signature")
    algorithm = popo_signing_key.getComponentByName("algorithmIdentifier")
    algorithm.setComponentByName("algorithm", univ.ObjectIdentifier(alg_oid))
    if params is not None:
        algorithm.setComponentByName("parameters", params)
    popo_signing_key.setComponentByName("signature", univ.BitString.fromOctetString(signature))
    return _encode_messages([message])


# ------------------------------------------------------------------------------------------ parse


def _oid_text(oid: Any) -> str:
    """Dotted form of a decoded OID; oversized arcs (hostile input) are not formatted."""
    arcs: tuple[int, ...] = tuple(oid)
    if any(arc.bit_length() > 128 for arc in arcs):
        return "(OID with oversized arcs)"
    return ".".join(str(arc) for arc in arcs)


def _optional(seq: Any, name: str) -> Any:
    """The component if present, else None (never instantiates an absent OPTIONAL component)."""
    return seq.getComponentByName(name, default=None, instantiate=False)


def _decode_message(der: bytes, what: str) -> Any:
    try:
        message, rest = der_decoder.decode(der, asn1Spec=rfc4211.CertReqMsg())
    except Exception as exc:  # pyasn1 raises PyAsn1Error and, on hostile input, assorted builtins
        raise errors.BadRequestError(f"{what}: not a DER CertReqMsg", field=what) from exc
    if rest:  # pragma: no cover - the outer TLV walk already sized the slice exactly
        raise errors.BadRequestError(f"{what}: trailing bytes", field=what)
    subject = _optional(message.getComponentByName("certReq").getComponentByName("certTemplate"), "subject")
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
    if _optional(popo_signing_key, "poposkInput") is not None:
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
    alg_oid = _oid_text(algorithm.getComponentByName("algorithm"))
    params = _optional(algorithm, "parameters")
    params_der = None if params is None else bytes(params)
    try:  # the one policy PKCS#10 uses too (iotdlm.pki.pop)
        digest = pop_policy.check_pop_algorithm(public_key, alg_oid)
    except errors.BadSignatureError as exc:
        raise errors.BadSignatureError(f"certReqId {cert_req_id}: POP {exc.message}", field=what) from exc
    except errors.UnsupportedError as exc:
        raise errors.UnsupportedError(f"{what}: POP {exc.message}", field=what) from exc
    rsa_key = isinstance(public_key, rsa.RSAPublicKey)
    allowed_params: tuple[bytes | None, ...] = (None, _DER_NULL) if rsa_key else (None,)
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
        _verify(public_key, signature, cert_req_der, digest)
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
        tag, s_req, e_req = _read_tlv(der, 0, end, what)  # CertReqMsg
        tag2, s_cr, e_cr = _read_tlv(der, s_req, e_req, what)  # CertRequest
        tag3, s_id, e_id = _read_tlv(der, s_cr, e_cr, what)  # certReqId
        tag4, s_t, e_t = _read_tlv(der, e_id, e_cr, what)  # CertTemplate
        tag5, s_n, e_n = _read_tlv(der, s_t, e_t, what)  # [5] Name
        if (tag, tag2, tag3, tag4, tag5) != (0x30, 0x30, 0x02, 0x30, 0xA5) or der[e_cr:] != b"\x80\x00":
            return None
        if e_id - s_id > 4 or der[e_n] != 0xA6:
            return None
        cert_req_id = int.from_bytes(der[s_id:e_id], "big")
        subject = _name_from_der(der[s_n:e_n], what)
        public_key = serialization.load_der_public_key(b"\x30" + der[e_n + 1 : e_t])
        if not isinstance(public_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey):
            return None
        if _ra_verified_message_der(cert_req_id, subject, public_key) != der:
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
    if not 0 <= cert_req_id <= _MAX_CERT_REQ_ID:
        # Never format the value: str() of a 5000-digit int raises ValueError (int_max_str_digits).
        raise errors.BadRequestError(f"{what}: certReqId is outside 0..{_MAX_CERT_REQ_ID}", field=what)
    template = request.getComponentByName("certTemplate")

    tagged_spki = _optional(template, "publicKey")
    if tagged_spki is None:
        raise errors.BadRequestError(f"certReqId {cert_req_id}: template has no publicKey", field=what)
    public_key = _public_key_from_asn1(tagged_spki, what)

    subject_choice = _optional(template, "subject")
    subject = None
    if subject_choice is not None:
        subject = _name_from_der(der_encoder.encode(subject_choice.getComponent()), what)

    ignored, extensions, unreadable = _template_extras(message, template)

    popo = _optional(message, "popo")
    if popo is None:
        raise errors.BadRequestError(f"certReqId {cert_req_id}: no proof of possession", field=what)
    pop_kind = popo.getName()
    pop: Literal["signature", "ra_verified"]
    if pop_kind == "raVerified":
        pop = "ra_verified"
    elif pop_kind == "signature":
        # The certReq bytes as sent: the first TLV inside the (canonical) CertReqMsg.
        _, content_start, _ = _read_tlv(der, 0, len(der), what)
        _, _, req_end = _read_tlv(der, content_start, len(der), what)
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
_EXTENSION_REQUEST: Final = _tlv(0x06, bytes.fromhex("2a864886f70d01090e"))  # PKCS#9 extensionRequest


def _template_extras(
    message: Any, template: Any
) -> tuple[tuple[str, ...], tuple[x509.Extension[x509.ExtensionType], ...], bool]:
    """(ignored field names, requested extensions, whether some were unreadable): what the requester
    asked for that the CA decides itself. Only read from what pyasn1 already decoded."""
    ignored = [name for name in _TEMPLATE_FIELDS if _optional(template, name) is not None]
    validity = _optional(template, "validity")
    if validity is not None and _optional(validity, "notBefore") is None and _optional(validity, "notAfter") is None:
        ignored.remove("validity")  # an empty OptionalValidity (OpenSSL sends one) asks for nothing
    if _optional(message.getComponentByName("certReq"), "controls") is not None:
        ignored.append("controls")
    if _optional(message, "regInfo") is not None:
        ignored.append("regInfo")
    tagged = _optional(template, "extensions")
    if tagged is None:
        return tuple(ignored), (), False
    # [9] IMPLICIT Extensions -> Extensions, read by cryptography from a PKCS#10 envelope (as for Names)
    extensions_der = b"\x30" + bytes(der_encoder.encode(tagged))[1:]
    attribute = _tlv(0x30, _EXTENSION_REQUEST + _tlv(0x31, extensions_der))
    info = _tlv(0x30, b"\x02\x01\x00\x30\x00" + _ENVELOPE_SPKI + _tlv(0xA0, attribute))
    envelope = _tlv(0x30, info + _ENVELOPE_ALG + b"\x03\x01\x00")
    try:
        return tuple(ignored), tuple(x509.load_der_x509_csr(envelope).extensions), False
    except Exception:  # cryptography raises assorted errors on hostile extensions: report, go on
        return tuple(ignored), (), True


# -------------------------------------------------------------------------------------------- CMP

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


def _cmp_body_of(data: bytes) -> str | None:
    """The PKIBody name if ``data`` is shaped like a PKIMessage (SEQUENCE { SEQUENCE, [n] ... }), else None.

    Cheap (two TLV headers, no ASN.1 decoding); CertReqMessages never has a context tag at that place.
    """
    try:
        tag, start, end = _read_tlv(data, 0, len(data), "m")
        if tag != 0x30:
            return None
        header_tag, _, header_end = _read_tlv(data, start, end, "m")
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
    return _cmp_body_of(bytes(data)) is not None


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
    body = _cmp_body_of(data)
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
    _, start, end = _read_tlv(data, 0, len(data), "PKIMessage")
    _, _, header_end = _read_tlv(data, start, end, "PKIMessage.header")
    _, body_start, body_end = _read_tlv(data, header_end, end, "PKIMessage.body")
    _, _, inner_end = _read_tlv(data, body_start, body_end, "PKIMessage.body")
    if inner_end != body_end:
        raise errors.BadRequestError(f"CMP {body} message: the body holds more than its CertReqMessages", field="crmf")
    protection: str | None = None
    if _optional(message, "protection") is not None:
        alg = _optional(message.getComponentByName("header"), "protectionAlg")
        oid = "?" if alg is None else _oid_text(alg.getComponentByName("algorithm"))
        protection = {_PBM: "password-based MAC", _DHBM: "Diffie-Hellman based MAC"}.get(
            oid, pop_policy.algorithm_name(oid)
        )
    return CmpRequest(body=body, cert_req_messages=data[body_start:body_end], protection=protection)


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
        tag, start, end = _read_tlv(data, 0, len(data), what)
    except errors.BadRequestError:
        tag, start, end = -1, 0, 0
    if tag != 0x30 or end != len(data):
        raise errors.BadRequestError(f"CertReqMessages: {describe_der_problem(data, 'CertReqMessages')}", field=what)
    cmp_body = _cmp_body_of(data)
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
        msg_tag, _, msg_end = _read_tlv(data, pos, end, item)
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
