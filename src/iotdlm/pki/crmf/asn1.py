"""The ASN.1 and key pieces CRMF building and parsing share: strict DER TLVs, Names and public keys
between cryptography and pyasn1, the POP signature over ``certReq``. Pure."""

from __future__ import annotations

from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1_modules import rfc3280

from iotdlm import errors
from iotdlm.pki import pop as pop_policy

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey

MAX_CRMF_BYTES: Final = 64 * 1024
"""Default upper bound on the size of a DER ``CertReqMessages`` given to :func:`iotdlm.pki.crmf.parse`."""

MAX_CERT_REQ_ID: Final = 2**31 - 1
DER_NULL: Final = b"\x05\x00"


# --------------------------------------------------------------------------------------------- keys


def key_label(key: object, field: str = "publicKey") -> str:
    """The key's label if :mod:`iotdlm.pki.pop` certifies it, else UnsupportedError naming ``field``."""
    try:
        return pop_policy.check_request_key(key)
    except errors.UnsupportedError as exc:
        raise errors.UnsupportedError(exc.message, field=field) from exc


def pop_sign(private_key: PrivateKey, data: bytes) -> tuple[str, bytes | None, bytes]:
    """(signature algorithm OID, DER parameters or None, signature) over ``data``."""
    public_key = private_key.public_key()
    key_label(public_key)
    alg = pop_policy.preferred_algorithm(public_key)
    digest = pop_policy.check_pop_algorithm(public_key, alg)
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        assert digest is not None
        return alg, None, private_key.sign(data, ec.ECDSA(digest))
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return alg, None, private_key.sign(data)
    assert digest is not None
    return alg, DER_NULL, private_key.sign(data, padding.PKCS1v15(), digest)


def pop_verify(public_key: PublicKey, signature: bytes, data: bytes, digest: hashes.HashAlgorithm | None) -> None:
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


def der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + der_length(len(content)) + content


def read_tlv(buf: bytes, pos: int, end: int, what: str) -> tuple[int, int, int]:
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


def name_to_asn1(subject: x509.Name) -> Any:
    """cryptography Name -> pyasn1 rfc3280.RDNSequence (the value of the Name CHOICE)."""
    name, rest = der_decoder.decode(subject.public_bytes(), asn1Spec=rfc3280.Name())
    if rest:  # pragma: no cover - cryptography always emits exactly one Name
        raise ValueError("trailing bytes after Name")
    return name.getComponentByName("rdnSequence")


# cryptography has no public loader for a bare DER Name, but its PKCS#10 loader parses one without
# checking any signature. Wrapping the Name in
# CertificationRequest { info { 0, Name, SPKI, [0] {} }, id-Ed25519, '' } and reading ``.subject`` gives
# cryptography's own strict string parsing and keeps every attribute's string type.
ENVELOPE_ALG: Final = tlv(0x30, bytes.fromhex("06032b6570"))  # id-Ed25519
ENVELOPE_SPKI: Final = tlv(0x30, ENVELOPE_ALG + tlv(0x03, b"\x00" + bytes(32)))
_ENVELOPE_TAIL: Final = ENVELOPE_SPKI + b"\xa0\x00"


def name_from_der(name_der: bytes, what: str) -> x509.Name:
    info = tlv(0x30, b"\x02\x01\x00" + name_der + _ENVELOPE_TAIL)
    envelope = tlv(0x30, info + ENVELOPE_ALG + b"\x03\x01\x00")
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


def spki_to_asn1(public_key: PublicKey, target: Any) -> None:
    """Fill ``target`` (the implicitly tagged [6] SubjectPublicKeyInfo) from a cryptography key."""
    spki_der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    spki, rest = der_decoder.decode(spki_der, asn1Spec=rfc3280.SubjectPublicKeyInfo())
    if rest:  # pragma: no cover - cryptography always emits exactly one SPKI
        raise ValueError("trailing bytes after SubjectPublicKeyInfo")
    target.setComponentByName("algorithm", spki.getComponentByName("algorithm"))
    target.setComponentByName("subjectPublicKey", spki.getComponentByName("subjectPublicKey"))


def public_key_from_asn1(tagged_spki: Any, what: str) -> PublicKey:
    # [6] IMPLICIT SubjectPublicKeyInfo: copy into an untagged SPKI to get the DER cryptography loads.
    spki = rfc3280.SubjectPublicKeyInfo()
    spki.setComponentByName("algorithm", tagged_spki.getComponentByName("algorithm"))
    spki.setComponentByName("subjectPublicKey", tagged_spki.getComponentByName("subjectPublicKey"))
    spki_der: bytes = der_encoder.encode(spki)
    try:
        key = serialization.load_der_public_key(spki_der)
    except UnsupportedAlgorithm as exc:
        alg = oid_text(tagged_spki.getComponentByName("algorithm").getComponentByName("algorithm"))
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


def oid_text(oid: Any) -> str:
    """Dotted form of a decoded OID; oversized arcs (hostile input) are not formatted."""
    arcs: tuple[int, ...] = tuple(oid)
    if any(arc.bit_length() > 128 for arc in arcs):
        return "(OID with oversized arcs)"
    return ".".join(str(arc) for arc in arcs)


def optional(seq: Any, name: str) -> Any:
    """The component if present, else None (never instantiates an absent OPTIONAL component)."""
    return seq.getComponentByName(name, default=None, instantiate=False)
