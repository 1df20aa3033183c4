"""EST (RFC 7030) message encoding for cm: pure functions, no I/O.

What goes over the wire (RFC 7030 as clarified by RFC 8951):

- requests (``simpleenroll``, ``simplereenroll``, ``serverkeygen``): ``Content-Type:
  application/pkcs10``, the body the base64 of a DER PKCS#10 request. RFC 8951 has receivers
  ignore ``Content-Transfer-Encoding`` and tolerate line breaks and other white space in the base64;
  we also take PEM armour (``-----BEGIN CERTIFICATE REQUEST-----``), which some clients send, and
  missing ``=`` padding. Anything else (non-ASCII, characters outside the alphabet, an empty body)
  is a :class:`~iotdlm.errors.BadRequestError`.
- responses: ``application/pkcs7-mime; smime-type=certs-only`` with the base64 of a certs-only CMS
  SignedData (RFC 5652 "degenerate" SignedData: no signers, only certificates), built by
  cryptography's ``pkcs7.serialize_certificates``; ``application/csrattrs`` with the base64 of a
  DER ``CsrAttrs``; for ``serverkeygen`` a ``multipart/mixed`` of the private key part and a
  certs-only part (RFC 7030 4.4.2). The key part is ``application/pkcs7-mime;
  smime-type=server-generated-key``, a CMS EnvelopedData km encrypted to the device (ADR 0009: cm
  never holds the key), or ``application/pkcs8`` where the operator chose ``est_serverkeygen =
  "cleartext"``.

Media types are compared case-insensitively without their parameters (RFC 9110 8.3.1).
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import univ
from pyasn1_modules import rfc5652, rfc7030

from iotdlm.errors import BadRequestError, TooLargeError, UnsupportedError
from iotdlm.pki.keys import Algorithm

WELL_KNOWN = "/.well-known/est"

PKCS10 = "application/pkcs10"
PKCS7_MIME = "application/pkcs7-mime"
CERTS_ONLY = f"{PKCS7_MIME}; smime-type=certs-only"
CSRATTRS = "application/csrattrs"
PKCS8 = "application/pkcs8"
#: RFC 7030 4.4.2: the key part of a serverkeygen response when the key is encrypted to the device
SERVER_GENERATED_KEY = f"{PKCS7_MIME}; smime-type=server-generated-key"

#: ASCII white space a base64 body may carry (RFC 8951 3: line breaks; we take blanks and tabs too)
_WHITESPACE = b" \t\r\n\x0b\x0c"
_B64 = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
#: base64 lines of responses: 64 characters, as in PEM
_LINE = 64


class UnsupportedMediaTypeError(UnsupportedError):
    """The request's Content-Type is not the one this endpoint takes (HTTP 415)."""

    code = "unsupported_media_type"


def media_type(header: str | None) -> str:
    """The bare media type of a Content-Type header, lowercased (``""`` when absent)."""
    if not header:
        return ""
    return header.split(";", 1)[0].strip().lower()


def media_type_params(header: str | None) -> dict[str, str]:
    """The parameters of a Content-Type header (names lowercased, quotes removed)."""
    out: dict[str, str] = {}
    if not header:
        return out
    for part in header.split(";")[1:]:
        name, sep, value = part.partition("=")
        if not sep:
            continue
        out[name.strip().lower()] = value.strip().strip('"')
    return out


def require_media_type(header: str | None, expected: str) -> None:
    """Raise :class:`UnsupportedMediaTypeError` unless ``header`` names ``expected``."""
    got = media_type(header)
    if got != expected:
        shown = got or "none"
        raise UnsupportedMediaTypeError(f"Content-Type must be {expected}, not {shown}", field="content-type")


def decode_base64_body(data: bytes, *, what: str, max_decoded: int) -> bytes:
    """The DER inside a base64 request body (see the module doc for what is tolerated)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadRequestError(f"{what} must be bytes")
    raw = bytes(data)
    if raw.lstrip(_WHITESPACE).startswith(b"-----BEGIN"):
        raw = _strip_pem_armour(raw, what)
    compact = raw.translate(None, _WHITESPACE)
    if not compact:
        raise BadRequestError(f"{what} is empty")
    body = compact.rstrip(b"=")
    if len(compact) - len(body) > 2 or not set(body) <= _B64:
        raise BadRequestError(f"{what} is not base64")
    if len(body) % 4 == 1:
        raise BadRequestError(f"{what} is not valid base64 (truncated)")
    if len(body) * 3 // 4 > max_decoded:
        raise TooLargeError(f"{what} exceeds the limit of {max_decoded} bytes")
    try:
        der = base64.b64decode(body + b"=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - the alphabet check above catches these
        raise BadRequestError(f"{what} is not valid base64") from exc
    if not der:
        raise BadRequestError(f"{what} is empty")
    return der


def _strip_pem_armour(raw: bytes, what: str) -> bytes:
    lines = raw.strip(_WHITESPACE).splitlines()
    if len(lines) < 2 or not lines[-1].strip().startswith(b"-----END"):
        raise BadRequestError(f"{what} has a PEM header but no PEM footer")
    inner = lines[1:-1]
    if any(b":" in line for line in inner):  # RFC 1421 headers (Proc-Type, DEK-Info): encrypted PEM
        raise BadRequestError(f"{what} is an encrypted or annotated PEM block; send the plain base64 request")
    return b"\n".join(inner)


def encode_base64_body(der: bytes) -> bytes:
    """Base64 of ``der`` in lines of 64 characters, each ended by CRLF (MIME style)."""
    text = base64.b64encode(der)
    return b"".join(text[i : i + _LINE] + b"\r\n" for i in range(0, len(text), _LINE))


def certs_only(certs: Sequence[x509.Certificate]) -> bytes:
    """A certs-only CMS SignedData (DER) carrying ``certs``."""
    if not certs:
        raise ValueError("a certs-only message needs at least one certificate")
    return pkcs7.serialize_certificates(list(certs), Encoding.DER)


# --- /csrattrs (RFC 7030 4.5) ------------------------------------------------------------------

#: an empty CsrAttrs (SEQUENCE of nothing): the server asks for nothing in particular
EMPTY_CSRATTRS = b"\x30\x00"
_ID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
_CURVES = {Algorithm.P256: "1.2.840.10045.3.1.7", Algorithm.P384: "1.3.132.0.34"}
_SIGNATURES = {
    Algorithm.P256: "1.2.840.10045.4.3.2",  # ecdsa-with-SHA256
    Algorithm.P384: "1.2.840.10045.4.3.3",  # ecdsa-with-SHA384
    Algorithm.ED25519: "1.3.101.112",  # id-Ed25519 (the key and the signature algorithm)
    Algorithm.RSA3072: "1.2.840.113549.1.1.11",  # sha256WithRSAEncryption
}


def csrattrs_der(algorithm: Algorithm | None) -> bytes:
    """DER ``CsrAttrs`` asking for a key and a signature algorithm (none: an empty sequence).

    For ECDSA it follows RFC 7030 4.5.2's example: the signature algorithm OID, and an attribute
    ``id-ecPublicKey`` whose value is the curve. No challengePassword: EST here authenticates with
    the TLS client certificate, not a password."""
    if algorithm is None:
        return EMPTY_CSRATTRS
    attrs = rfc7030.CsrAttrs()
    sig = rfc7030.AttrOrOID()
    sig["oid"] = univ.ObjectIdentifier(_SIGNATURES[algorithm])
    attrs.append(sig)
    curve = _CURVES.get(algorithm)
    if curve is not None:
        attribute = rfc5652.Attribute()
        attribute["attrType"] = univ.ObjectIdentifier(_ID_EC_PUBLIC_KEY)
        attribute["attrValues"].append(univ.Any(der_encoder.encode(univ.ObjectIdentifier(curve))))
        key = rfc7030.AttrOrOID()
        key["attribute"] = attribute
        attrs.append(key)
    return bytes(der_encoder.encode(attrs))


# --- /serverkeygen (RFC 7030 4.4.2) -------------------------------------------------------------


def serverkeygen_multipart(
    key_der: bytes, certs_only_der: bytes, *, encrypted: bool, boundary: str | None = None
) -> tuple[str, bytes]:
    """(Content-Type, body) of a serverkeygen response: the private key part, then the certs-only
    part, both base64. ``encrypted``: ``key_der`` is km's CMS EnvelopedData, sent as
    ``application/pkcs7-mime; smime-type=server-generated-key`` (RFC 7030 4.4.2; encrypted to the
    key of the client certificate, not to a key the client named: this server reads no
    DecryptKeyIdentifier / AsymmetricDecryptKeyIdentifier attribute); otherwise a PKCS#8 key in
    the clear, ``application/pkcs8`` (est_serverkeygen = "cleartext")."""
    b = boundary or f"iotdlm-est-{secrets.token_hex(12)}"
    parts = [
        (SERVER_GENERATED_KEY if encrypted else PKCS8, key_der),
        (CERTS_ONLY, certs_only_der),
    ]
    out = bytearray()
    for ctype, der in parts:
        out += f"--{b}\r\nContent-Type: {ctype}\r\nContent-Transfer-Encoding: base64\r\n\r\n".encode()
        out += encode_base64_body(der)
    out += f"--{b}--\r\n".encode()
    return f'multipart/mixed; boundary="{b}"', bytes(out)


__all__ = [
    "CERTS_ONLY",
    "CSRATTRS",
    "PKCS7_MIME",
    "PKCS8",
    "PKCS10",
    "SERVER_GENERATED_KEY",
    "WELL_KNOWN",
    "UnsupportedMediaTypeError",
    "certs_only",
    "csrattrs_der",
    "decode_base64_body",
    "encode_base64_body",
    "media_type",
    "media_type_params",
    "require_media_type",
    "serverkeygen_multipart",
]
