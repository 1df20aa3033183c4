"""C509 certificates of type 3 (CBOR re-encoded X.509 v3): DER <-> C509, lossless.

:func:`encode_c509` re-encodes a DER certificate element by element (draft section 3.1) and then
decodes its own output: only when that gives back the very same DER bytes does it return the C509
form, so a certificate it cannot carry without loss is refused (UnsupportedError), never silently
changed. :func:`decode_c509` takes untrusted bytes and returns DER, or raises BadRequestError with
a message that says what is wrong -- never a library's traceback.

Layout of a C509Certificate (draft figure 1): ``[type, serial, signatureAlgorithm, issuer / null,
notBefore, notAfter / null, subject, subjectPublicKeyAlgorithm, subjectPublicKey, extensions,
issuerSignatureValue]``.

Pure: no I/O.
"""

from __future__ import annotations

import datetime as dt
import io
import re
from typing import Any, Final

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from iotdlm.c509 import _der, extensions, names, registry
from iotdlm.c509._der import DerError
from iotdlm.errors import BadRequestError, RejectedError, TooLargeError, UnsupportedError

#: c509CertificateType of a CBOR re-encoded X.509 v3 certificate (draft section 8.2; drafts up to
#: -09 numbered it 1)
C509_REENCODED: Final = 3
#: the largest C509 certificate (and DER certificate) this codec reads
MAX_CERTIFICATE_BYTES: Final = 64 * 1024
_FIELDS: Final = 11
_SIG_BY_DER: Final = registry.inverse(registry.SIGNATURE_ALGORITHMS)
_PK_BY_DER: Final = registry.inverse(registry.PUBLIC_KEY_ALGORITHMS)
_NO_EXPIRY: Final = b"99991231235959Z"
_UTC_RE: Final = re.compile(rb"^\d{12}Z$")
_GEN_RE: Final = re.compile(rb"^\d{14}Z$")
_CURVES: Final = {1: ec.SECP256R1(), 2: ec.SECP384R1(), 3: ec.SECP521R1()}
_ECDSA_WIDTHS: Final = (32, 48, 66)


# --- algorithm identifiers -------------------------------------------------------------------------
def _encode_algorithm(alg_der: bytes, table: dict[str, int]) -> Any:
    number = table.get(alg_der.hex())
    if number is not None:
        return number
    (t_oid, oid), *params = _der.read_all(_der.read_one(alg_der, _der.SEQUENCE))
    if t_oid != _der.OID or len(params) > 1:
        raise DerError("bad AlgorithmIdentifier")
    return [oid, _der.tlv(*params[0])] if params else oid


def _decode_algorithm(item: object, table: dict[int, str]) -> bytes:
    if names.is_int(item):
        assert isinstance(item, int)
        if item not in table:
            raise DerError(f"algorithm {item} is not in the C509 registry here")
        return bytes.fromhex(table[item])
    if isinstance(item, bytes):
        return _der.tlv(_der.SEQUENCE, _der.tlv(_der.OID, _der.oid_content(_der.oid_dotted(item))))
    if isinstance(item, list) and len(item) == 2 and isinstance(item[0], bytes) and isinstance(item[1], bytes):
        _der.read_one(item[1])
        return _der.tlv(_der.SEQUENCE, _der.tlv(_der.OID, _der.oid_content(_der.oid_dotted(item[0]))) + item[1])
    raise DerError("an algorithm must be an int, an OID or [OID, parameters]")


# --- times -------------------------------------------------------------------------------------------
def _encode_time(tag: int, content: bytes, *, not_after: bool) -> int | None:
    if not_after and tag == _der.GENERALIZED_TIME and content == _NO_EXPIRY:
        return None
    if tag == _der.UTC_TIME and _UTC_RE.match(content):
        yy = int(content[:2])
        text = (b"19" if yy >= 50 else b"20") + content
    elif tag == _der.GENERALIZED_TIME and _GEN_RE.match(content):
        text = content
    else:
        raise DerError("a time with fractions or an offset has no C509 form")
    when = dt.datetime.strptime(text.decode(), "%Y%m%d%H%M%SZ").replace(tzinfo=dt.UTC)
    return int(when.timestamp())


def _decode_time(item: object, *, not_after: bool) -> bytes:
    if item is None and not_after:
        return _der.tlv(_der.GENERALIZED_TIME, _NO_EXPIRY)
    if not names.is_int(item) or not isinstance(item, int) or item < 0:
        raise DerError("a time must be a non-negative integer (seconds since 1970)")
    try:
        when = dt.datetime.fromtimestamp(item, dt.UTC)
    except (OverflowError, ValueError, OSError) as exc:
        raise DerError("a time beyond the year 9999") from exc
    if when.year < 2050:  # RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050
        return _der.tlv(_der.UTC_TIME, when.strftime("%y%m%d%H%M%SZ").encode())
    return _der.tlv(_der.GENERALIZED_TIME, when.strftime("%Y%m%d%H%M%SZ").encode())


# --- subjectPublicKey and issuerSignatureValue (draft section 3.2) ----------------------------------
def _bit_string_octets(content: bytes) -> bytes:
    if not content or content[0] != 0:
        raise DerError("a BIT STRING with unused bits has no C509 form")
    return content[1:]


def _encode_public_key(alg: Any, key: bytes) -> Any:
    if alg in _CURVES and key[:1] == b"\x04":
        size = (len(key) - 1) // 2
        return (b"\xfe" if key[-1] % 2 == 0 else b"\xfd") + key[1 : 1 + size]
    if alg == registry.RSA_PUBLIC_KEY:
        (t_n, n), (t_e, e) = _der.read_all(_der.read_one(key, _der.SEQUENCE))
        if (t_n, t_e) != (_der.INTEGER, _der.INTEGER):
            raise DerError("bad RSA public key")
        modulus = _der.unsigned_bytes(_der.read_integer(n))
        exponent = _der.read_integer(e)
        return modulus if exponent == 65537 else [modulus, _der.unsigned_bytes(exponent)]
    return key


def _decode_public_key(alg: object, item: object) -> bytes:
    if isinstance(alg, int) and alg in _CURVES and isinstance(item, bytes) and item[:1] in (b"\xfe", b"\xfd"):
        compressed = (b"\x02" if item[0] == 0xFE else b"\x03") + item[1:]
        try:
            point = ec.EllipticCurvePublicKey.from_encoded_point(_CURVES[alg], compressed)
        except ValueError as exc:
            raise DerError("the public key is not a point on its curve") from exc
        return point.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    if alg == registry.RSA_PUBLIC_KEY:
        modulus, exponent = (item, b"\x01\x00\x01") if isinstance(item, bytes) else _pair_of_bytes(item)
        n, e = int.from_bytes(modulus, "big"), int.from_bytes(exponent, "big")
        return _der.tlv(_der.SEQUENCE, _der.integer(n) + _der.integer(e))
    if not isinstance(item, bytes):
        raise DerError("subjectPublicKey must be bytes for this algorithm")
    return item


def _pair_of_bytes(item: object) -> tuple[bytes, bytes]:
    if isinstance(item, list) and len(item) == 2 and all(isinstance(x, bytes) for x in item):
        return item[0], item[1]
    raise DerError("an RSA key must be the modulus or [modulus, exponent]")


def _encode_signature(alg: Any, signature: bytes) -> bytes:
    if alg not in registry.ECDSA_SIGNATURES:
        return signature
    r, s = decode_dss_signature(signature)
    longest = max((r.bit_length() + 7) // 8, (s.bit_length() + 7) // 8)
    width = next((w for w in _ECDSA_WIDTHS if w >= longest), longest)
    return r.to_bytes(width, "big") + s.to_bytes(width, "big")


def _decode_signature(alg: object, item: object) -> bytes:
    if not isinstance(item, bytes):
        raise DerError("issuerSignatureValue must be bytes")
    if alg not in registry.ECDSA_SIGNATURES:
        return item
    half = len(item) // 2
    if not item or len(item) % 2:
        raise DerError("an ECDSA signature must be r || s of equal lengths")
    return encode_dss_signature(int.from_bytes(item[:half], "big"), int.from_bytes(item[half:], "big"))


# --- the certificate ------------------------------------------------------------------------------
def _tbs_parts(tbs: bytes) -> dict[str, bytes]:
    """The TBSCertificate's elements by name, each as its whole DER element."""
    elements = [_der.tlv(tag, content) for tag, content in _der.read_all(tbs)]
    if not elements or elements[0] != b"\xa0\x03\x02\x01\x02":
        raise UnsupportedError("only X.509 v3 certificates have a C509 form", field="certificate")
    if len(elements) < 7 or any(e[0] in (0xA1, 0xA2) for e in elements[7:]):
        raise UnsupportedError("issuerUniqueID and subjectUniqueID have no C509 form", field="certificate")
    named = dict(
        zip(("version", "serial", "signature", "issuer", "validity", "subject", "spki"), elements, strict=False)
    )
    rest = elements[7:]
    if len(rest) > 1 or (rest and rest[0][0] != 0xA3):
        raise DerError("unexpected elements after subjectPublicKeyInfo")
    if rest:
        named["extensions"] = _der.read_one(rest[0], 0xA3)
    return named


def _encode_fields(der: bytes) -> list[Any]:
    tbs, sig_alg, sig_value = (_der.tlv(t, c) for t, c in _der.read_all(_der.read_one(der, _der.SEQUENCE)))
    p = _tbs_parts(_der.read_one(tbs, _der.SEQUENCE))
    if sig_alg != p["signature"]:
        raise UnsupportedError("the certificate's two signature algorithm fields differ", field="certificate")
    serial = _der.read_integer(_der.read_one(p["serial"], _der.INTEGER))
    if serial < 0:
        raise UnsupportedError("a negative serial number has no C509 form", field="certificate")
    (t_nb, nb), (t_na, na) = _der.read_all(_der.read_one(p["validity"], _der.SEQUENCE))
    (t_alg, alg), (t_key, key) = _der.read_all(_der.read_one(p["spki"], _der.SEQUENCE))
    if t_key != _der.BIT_STRING:
        raise DerError("bad subjectPublicKeyInfo")
    sig = _encode_algorithm(sig_alg, _SIG_BY_DER)
    pk_alg = _encode_algorithm(_der.tlv(t_alg, alg), _PK_BY_DER)
    return [
        C509_REENCODED,
        _der.unsigned_bytes(serial),
        sig,
        None if p["issuer"] == p["subject"] else names.encode_name(p["issuer"]),
        _encode_time(t_nb, nb, not_after=False),
        _encode_time(t_na, na, not_after=True),
        names.encode_name(p["subject"]),
        pk_alg,
        _encode_public_key(pk_alg, _bit_string_octets(key)),
        extensions.encode_extensions(p.get("extensions")),
        _encode_signature(sig, _bit_string_octets(_der.read_one(sig_value, _der.BIT_STRING))),
    ]


def encode_c509(der: bytes) -> bytes:
    """A DER X.509 v3 certificate -> its C509 re-encoding (c509CertificateType 3), lossless.

    Raises BadRequestError when ``der`` is not a DER certificate, UnsupportedError when the
    certificate has no lossless C509 form (the message says which part)."""
    if not isinstance(der, bytes) or len(der) > MAX_CERTIFICATE_BYTES:
        raise TooLargeError(f"a certificate to re-encode must be at most {MAX_CERTIFICATE_BYTES} bytes of DER")
    try:
        _parse_whole(der)
    except _NOT_A_CERTIFICATE as exc:
        raise BadRequestError("not a valid DER X.509 certificate", field="certificate") from exc
    try:
        encoded = cbor2.dumps(_encode_fields(der))
    except (ValueError, TypeError, IndexError, KeyError) as exc:  # DerError is a ValueError
        raise UnsupportedError(f"this certificate has no C509 form: {_reason(exc)}", field="certificate") from exc
    try:
        same = decode_c509(encoded) == der
    except RejectedError:
        same = False
    if not same:
        raise UnsupportedError(
            "this certificate cannot be re-encoded as C509 without loss (a field is not in the DER "
            "form C509 rebuilds: e.g. a time in the wrong ASN.1 type or a non-minimal encoding)",
            field="certificate",
        )
    return encoded


def _load_array(data: bytes) -> list[Any]:
    if len(data) > MAX_CERTIFICATE_BYTES:
        raise TooLargeError(f"a C509 certificate must be at most {MAX_CERTIFICATE_BYTES} bytes", field="certificate")
    stream = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(stream).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        raise BadRequestError(
            "not a C509 certificate: the bytes are not well-formed CBOR", field="certificate"
        ) from exc
    if stream.tell() != len(data):
        raise BadRequestError("not a C509 certificate: bytes follow the CBOR array", field="certificate")
    if not isinstance(item, list) or len(item) != _FIELDS:
        raise BadRequestError(
            f"not a C509 certificate: expected a CBOR array of {_FIELDS} elements", field="certificate"
        )
    if item[0] != C509_REENCODED or not names.is_int(item[0]):
        raise UnsupportedError(
            f"C509 certificate type {item[0]!r} is not supported: only type {C509_REENCODED} "
            "(re-encoded X.509) can be turned back into DER",
            field="certificate",
        )
    return item


def _decode_fields(f: list[Any]) -> bytes:
    if not isinstance(f[1], bytes):
        raise DerError("certificateSerialNumber must be a byte string")
    sig_alg = _decode_algorithm(f[2], registry.SIGNATURE_ALGORITHMS)
    if f[6] is None:
        raise DerError("subject must not be null")
    subject = names.decode_name(f[6])
    issuer = subject if f[3] is None else names.decode_name(f[3])
    validity = _der.tlv(_der.SEQUENCE, _decode_time(f[4], not_after=False) + _decode_time(f[5], not_after=True))
    key = _decode_public_key(f[7], f[8])
    spki = _der.tlv(
        _der.SEQUENCE, _decode_algorithm(f[7], registry.PUBLIC_KEY_ALGORITHMS) + _der.tlv(_der.BIT_STRING, b"\0" + key)
    )
    exts = extensions.decode_extensions(f[9])
    tbs = _der.tlv(
        _der.SEQUENCE,
        b"\xa0\x03\x02\x01\x02"
        + _der.integer(int.from_bytes(f[1], "big"))
        + sig_alg
        + issuer
        + validity
        + subject
        + spki
        + (b"" if exts is None else _der.tlv(0xA3, exts)),
    )
    signature = _der.tlv(_der.BIT_STRING, b"\0" + _decode_signature(f[2], f[10]))
    return _der.tlv(_der.SEQUENCE, tbs + sig_alg + signature)


def decode_c509(data: bytes) -> bytes:
    """A C509 certificate (type 3) -> the DER X.509 certificate it re-encodes.

    Raises BadRequestError (or TooLargeError, UnsupportedError for another c509CertificateType)
    with what is wrong; the DER returned is a well-formed X.509 certificate, its signature NOT
    verified (the caller verifies the chain as for any DER certificate)."""
    if not isinstance(data, bytes):
        raise BadRequestError("a C509 certificate must be bytes", field="certificate")
    fields = _load_array(data)
    try:
        der = _decode_fields(fields)
    # RuntimeError: cbor2 gives back self-referencing tags (CBOR's shared references) that raise it
    # when hashed or compared (Hypothesis found one); RecursionError is one too
    except (DerError, ValueError, TypeError, IndexError, KeyError, OverflowError, RuntimeError) as exc:
        raise BadRequestError(f"not a valid C509 certificate: {_reason(exc)}", field="certificate") from exc
    try:
        _parse_whole(der)
    except _NOT_A_CERTIFICATE as exc:
        raise BadRequestError(
            "not a valid C509 certificate: it does not rebuild a valid X.509 certificate", field="certificate"
        ) from exc
    return der


#: what cryptography raises for bytes that are not a whole, valid certificate
_NOT_A_CERTIFICATE: Final = (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


def _parse_whole(der: bytes) -> None:
    """Parse all of a DER certificate (cryptography parses names and extensions lazily)."""
    cert = x509.load_der_x509_certificate(der)
    _ = (cert.subject, cert.issuer, cert.extensions)


def _reason(exc: Exception) -> str:
    """Our own messages as they are; a library's (or Python's) replaced by a plain phrase."""
    return str(exc) if isinstance(exc, DerError) else "an element has the wrong type or shape"
