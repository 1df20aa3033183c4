"""Enrollment over CoAP with EDHOC and OSCORE (draft-ietf-ace-coap-est-oscore): the payloads and the
EDHOC credentials, pure (no I/O). ADR 0029.

Resources (RFC 9148's short names, below ``/.well-known/est``):

- ``crts`` GET: the CA certificates, ``application/pkcs7-mime; smime-type=certs-only`` (281), DER.
  No protection needed (a device checks them against what it already trusts).
- ``pn`` POST, OSCORE only: a proof nonce from km (ADR 0008). Request: the certificate the device
  enrolls with (``application/pkix-cert``, 287); answer: the nonce (``text/plain``, 0).
- ``sen`` / ``sren`` POST, OSCORE only: simpleenroll / simplereenroll. Request: an
  ``application/multipart-core`` (62, RFC 8710) array ``[286, csr, 287, certificate, 0, proof]``:
  the PKCS#10 request (DER), the certificate whose key ran EDHOC (the factory certificate to enroll,
  the operational one to re-enroll: DER, or C509 below), and the proof km checks (the text of the
  ``Iotdlm-Est-Proof`` header). Answer: the certificate (``application/pkix-cert``, 287), DER, or
  C509 when asked.

EDHOC credentials are CWT Claims Sets (CCS, RFC 8392 with a ``cnf`` COSE_Key), the only kind
lakers takes: ``{2: subject, 8: {1: {1: 2, -1: 1, -2: x, -3: y, 2: kid}}}`` for a P-256 key
(cipher suite 2). The device's CCS carries the public key of its certificate and a kid naming the
certificate (the first 8 bytes of its SHA-256, like an x5t); it sends it by value (ID_CRED_I
``{14: CCS}``). cm's CCS is pinned on the device and named by its kid.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7

from iotdlm.c509 import decode_c509, decode_c509_bag, encode_c509, encode_c509_bag
from iotdlm.errors import BadRequestError, TooLargeError, UnsupportedError

WELL_KNOWN = (".well-known", "est")
#: the trust transfer's per-device message over CoAP (POST the certificate, OSCORE only)
TRANSFER_MESSAGE = ("transfer", "tm")
#: CoAP Content-Formats (IANA registry; RFC 7252, RFC 8710, RFC 9148)
TEXT_PLAIN = 0
CWT = 61
MULTIPART_CORE = 62
CERTS_ONLY = 281
PKCS10 = 286
PKIX_CERT = 287
#: application/cose-c509-cert (draft-ietf-cose-cbor-encoded-cert: TBD6): Experimental-use number
C509_CERT = 65025
#: application/cose-c509, a COSE_C509 bag (draft: TBD1), for ``crts``: Experimental-use number
C509_BAG = 65026
#: the certificate formats a request may carry, and what an answer may be asked in (Accept)
CERT_FORMATS = (PKIX_CERT, C509_CERT)

#: largest certificate a request may carry (ours are well under 2 KiB)
MAX_CERT_BYTES = 8 * 1024
#: largest proof text (km's nonce, a space and an RSA-4096 signature in base64)
MAX_PROOF_BYTES = 1024
#: largest enrollment request payload
MAX_ENROLL_BYTES = 32 * 1024
#: CCS label (RFC 9528 3.5.3: ID_CRED_x {14: CCS}); CWT claims sub (2) and cnf (8); cnf COSE_Key (1)
KCCS = 14
_SUB, _CNF, _COSE_KEY = 2, 8, 1
#: how many bytes of the certificate's SHA-256 name it in the kid
KID_BYTES = 8


def certificate_kid(certificate_der: bytes) -> bytes:
    """The kid naming a certificate: the first 8 bytes of its SHA-256 (a truncated x5t)."""
    return hashlib.sha256(certificate_der).digest()[:KID_BYTES]


def ccs_for(public_key: ec.EllipticCurvePublicKey, subject: str, kid: bytes) -> dict[int, Any]:
    """The CCS of a P-256 public key (cipher suite 2)."""
    if not isinstance(public_key.curve, ec.SECP256R1):
        raise UnsupportedError("EDHOC cipher suite 2 needs a P-256 key", field="key")
    numbers = public_key.public_numbers()
    cose_key = {1: 2, -1: 1, -2: numbers.x.to_bytes(32, "big"), -3: numbers.y.to_bytes(32, "big"), 2: kid}
    return {_SUB: subject, _CNF: {_COSE_KEY: cose_key}}


def ccs_bytes(ccs: dict[int, Any]) -> bytes:
    """CRED_x as EDHOC signs it: the CCS in deterministic CBOR."""
    return cbor2.dumps(ccs, canonical=True)


def ccs_public_key(ccs: object) -> ec.EllipticCurvePublicKey:
    """The P-256 key of a CCS, or BadRequestError saying what is wrong with it."""
    if not isinstance(ccs, dict):
        raise BadRequestError("the EDHOC credential is not a CWT claims set (a CBOR map)", field="id_cred")
    cnf = ccs.get(_CNF)
    key = cnf.get(_COSE_KEY) if isinstance(cnf, dict) else None
    if not isinstance(key, dict):
        raise BadRequestError("the EDHOC credential has no cnf COSE_Key", field="id_cred")
    if key.get(1) != 2 or key.get(-1) != 1:
        raise UnsupportedError("the EDHOC credential's key is not an EC2 P-256 key (cipher suite 2)", field="id_cred")
    x, y = key.get(-2), key.get(-3)
    if not (isinstance(x, bytes) and isinstance(y, bytes) and len(x) == 32 and len(y) == 32):
        raise BadRequestError("the EDHOC credential's key coordinates are not 32 bytes each", field="id_cred")
    try:
        return ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
        ).public_key()
    except ValueError as exc:
        raise BadRequestError("the EDHOC credential's key is not a point on P-256", field="id_cred") from exc


def parse_id_cred_by_value(id_cred: bytes) -> dict[int, Any]:
    """The CCS inside ID_CRED_I ``{14: CCS}`` (its key checked), or a RejectedError."""
    try:
        parsed = cbor2.loads(id_cred)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise BadRequestError("ID_CRED_I is not CBOR", field="id_cred") from exc
    if not isinstance(parsed, dict) or set(parsed) != {KCCS}:
        raise UnsupportedError(
            "send the EDHOC credential by value (ID_CRED_I {14: CCS}): cm does not know devices by kid",
            field="id_cred",
        )
    ccs = parsed[KCCS]
    ccs_public_key(ccs)
    assert isinstance(ccs, dict)
    return ccs


def same_key(a: ec.EllipticCurvePublicKey, b: object) -> bool:
    """Whether ``b`` is the same P-256 public key as ``a``."""
    return isinstance(b, ec.EllipticCurvePublicKey) and a.public_numbers() == b.public_numbers()


# --- sen / sren ---------------------------------------------------------------------------------
def encode_enroll(csr_der: bytes, certificate_der: bytes, proof: str) -> bytes:
    """The multipart-core payload of ``sen`` / ``sren``."""
    return cbor2.dumps([PKCS10, csr_der, PKIX_CERT, certificate_der, TEXT_PLAIN, proof.encode("ascii")])


def decode_enroll(payload: bytes) -> tuple[bytes, bytes, str]:
    """(csr, certificate, proof) of a ``sen`` / ``sren`` payload, or a RejectedError in words."""
    if len(payload) > MAX_ENROLL_BYTES:
        raise TooLargeError(f"the enrollment request exceeds {MAX_ENROLL_BYTES} bytes")
    try:
        items = cbor2.loads(payload)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise BadRequestError("the enrollment request is not CBOR (application/multipart-core)") from exc
    if not isinstance(items, list) or len(items) != 6:
        raise BadRequestError(
            "the enrollment request must be the multipart-core array [286, csr, 287, certificate, 0, proof]"
        )
    formats, parts = items[0::2], items[1::2]
    if formats != [PKCS10, PKIX_CERT, TEXT_PLAIN] or not all(isinstance(p, bytes) for p in parts):
        raise BadRequestError(
            "the enrollment request must be the multipart-core array [286, csr, 287, certificate, 0, proof]"
        )
    csr, cert, proof = parts
    if not csr or not cert:
        raise BadRequestError("the enrollment request's CSR or certificate is empty")
    if len(cert) > MAX_CERT_BYTES or len(proof) > MAX_PROOF_BYTES:
        raise TooLargeError("the enrollment request's certificate or proof is too long")
    try:
        text = proof.decode("ascii")
    except UnicodeDecodeError as exc:
        raise BadRequestError("the enrollment request's proof is not ASCII text", field="proof") from exc
    return csr, cert, text


@dataclass(frozen=True)
class EnrollRequest:
    """A ``sen`` / ``sren`` payload: the CSR, the certificate (DER; None in the compact form, where
    it is the one sent to ``pn`` in the session) and the proof text."""

    csr: bytes
    certificate: bytes | None
    proof: str


def encode_enroll_compact(csr_der: bytes, proof: str) -> bytes:
    """The compact ``sen`` / ``sren`` payload ``[286, csr, 0, proof]`` (the certificate went to ``pn``)."""
    return cbor2.dumps([PKCS10, csr_der, TEXT_PLAIN, proof.encode("ascii")])


def encode_enroll_c509(csr_der: bytes, certificate_der: bytes, proof: str) -> bytes:
    """The ``sen`` / ``sren`` payload with the certificate as C509 ``[286, csr, C509_CERT, c509, 0, proof]``."""
    return cbor2.dumps([PKCS10, csr_der, C509_CERT, encode_c509(certificate_der), TEXT_PLAIN, proof.encode("ascii")])


def decode_enroll_request(payload: bytes) -> EnrollRequest:
    """Any of the three ``sen`` / ``sren`` forms (DER, C509 or compact), the certificate given back
    as DER, or a RejectedError in words."""
    if len(payload) > MAX_ENROLL_BYTES:
        raise TooLargeError(f"the enrollment request exceeds {MAX_ENROLL_BYTES} bytes")
    items = _cbor(payload, "the enrollment request is not CBOR (application/multipart-core)")
    if isinstance(items, list) and len(items) == 4 and items[0::2] == [PKCS10, TEXT_PLAIN]:
        csr, proof = items[1::2]
        return EnrollRequest(*_enroll_parts(csr, None, proof))
    if isinstance(items, list) and len(items) == 6 and items[2] == C509_CERT and items[0::4] == [PKCS10, TEXT_PLAIN]:
        csr, c509, proof = items[1::2]
        if not isinstance(c509, bytes) or not c509:
            raise BadRequestError("the enrollment request's C509 certificate is empty")
        return EnrollRequest(*_enroll_parts(csr, decode_certificate(c509, C509_CERT, "the certificate sent"), proof))
    return EnrollRequest(*decode_enroll(payload))


def _enroll_parts(csr: object, cert: bytes | None, proof: object) -> tuple[bytes, bytes | None, str]:
    if not isinstance(csr, bytes) or not csr or not isinstance(proof, bytes):
        raise BadRequestError("the enrollment request must be [286, csr, 0, proof] (multipart-core byte strings)")
    if len(proof) > MAX_PROOF_BYTES:
        raise TooLargeError("the enrollment request's proof is too long")
    try:
        return csr, cert, proof.decode("ascii")
    except UnicodeDecodeError as exc:
        raise BadRequestError("the enrollment request's proof is not ASCII text", field="proof") from exc


def _cbor(payload: bytes, what: str) -> Any:
    try:
        return cbor2.loads(payload)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        raise BadRequestError(what) from exc


def decode_certificate(payload: bytes, fmt: int, what: str) -> bytes:
    """The DER of a certificate sent as ``fmt`` (DER 287 or C509), checked to parse, or a RejectedError."""
    if len(payload) > MAX_CERT_BYTES:
        raise TooLargeError(f"{what} exceeds {MAX_CERT_BYTES} bytes")
    if fmt == C509_CERT:
        der = decode_c509(payload)
    elif fmt == PKIX_CERT:
        der = payload
    else:
        raise UnsupportedError(f"{what}: Content-Format {fmt} is not a certificate (287 or {C509_CERT})")
    load_certificate(der, what)
    return der


def encode_certificate(der: bytes, fmt: int) -> bytes:
    """A DER certificate in the format a device asked for (287: as is; C509)."""
    return encode_c509(der) if fmt == C509_CERT else der


def certs_only_der(ders: list[bytes]) -> bytes:
    """The certs-only CMS message of DER certificates (``crts``, 281)."""
    certs = [x509.load_der_x509_certificate(d) for d in ders]
    return pkcs7.serialize_certificates(certs, serialization.Encoding.DER)


def encode_crts(ders: list[bytes], fmt: int) -> bytes:
    """``crts`` in the format asked: certs-only (281) or a COSE_C509 bag."""
    return encode_c509_bag(ders) if fmt == C509_BAG else certs_only_der(ders)


def decode_crts(payload: bytes, fmt: int) -> list[bytes]:
    """The DER certificates of a ``crts`` answer (281 or a COSE_C509 bag), or a RejectedError."""
    if fmt == C509_BAG:
        return decode_c509_bag(payload)
    try:
        certs = pkcs7.load_der_pkcs7_certificates(payload)
    except ValueError as exc:
        raise BadRequestError("the crts answer is not a certs-only CMS message") from exc
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


def load_certificate(der: bytes, what: str) -> x509.Certificate:
    """A DER certificate, or BadRequestError naming ``what``."""
    if len(der) > MAX_CERT_BYTES:
        raise TooLargeError(f"{what} exceeds {MAX_CERT_BYTES} bytes")
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise BadRequestError(f"{what} is not a DER X.509 certificate") from exc


__all__ = [
    "C509_BAG",
    "C509_CERT",
    "CERTS_ONLY",
    "CERT_FORMATS",
    "CWT",
    "KCCS",
    "MULTIPART_CORE",
    "PKCS10",
    "PKIX_CERT",
    "TEXT_PLAIN",
    "TRANSFER_MESSAGE",
    "WELL_KNOWN",
    "EnrollRequest",
    "ccs_bytes",
    "ccs_for",
    "ccs_public_key",
    "certificate_kid",
    "certs_only_der",
    "decode_certificate",
    "decode_crts",
    "decode_enroll",
    "decode_enroll_request",
    "encode_certificate",
    "encode_crts",
    "encode_enroll",
    "encode_enroll_c509",
    "encode_enroll_compact",
    "load_certificate",
    "parse_id_cred_by_value",
    "same_key",
]
