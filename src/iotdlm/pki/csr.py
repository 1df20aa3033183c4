"""PKCS#10 certificate signing requests: parse, bound, and check the proof of possession.

The CSR's own signature is its proof of possession (RFC 2986); we verify it before anything else
looks at the request.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding

from iotdlm.errors import BadRequestError, BadSignatureError, TooLargeError, UnsupportedError
from iotdlm.pki.keys import PublicKey, check_public_key

MAX_CSR_BYTES = 16 * 1024


@dataclass(frozen=True)
class CsrRequest:
    subject: x509.Name
    public_key: PublicKey
    der: bytes


def load_csr(data: bytes, *, max_bytes: int = MAX_CSR_BYTES) -> x509.CertificateSigningRequest:
    """A CSR from PEM or DER bytes (without checking it)."""
    if len(data) > max_bytes:
        raise TooLargeError(f"CSR of {len(data)} bytes exceeds the limit of {max_bytes}", field="csr")
    if not data:
        raise BadRequestError("CSR is empty", field="csr")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except (ValueError, x509.InvalidVersion) as exc:
        raise BadRequestError(f"CSR is not a valid PKCS#10 request in PEM or DER: {exc}", field="csr") from exc


def parse_csr(data: bytes, *, max_bytes: int = MAX_CSR_BYTES) -> CsrRequest:
    """Parse a CSR and verify its self-signature (proof of possession of the private key)."""
    csr = load_csr(data, max_bytes=max_bytes)
    try:
        public_key = check_public_key(csr.public_key())
    except UnsupportedError:
        raise
    except (ValueError, UnsupportedAlgorithm) as exc:  # unknown key type, bad curve point
        raise UnsupportedError(f"CSR public key is not supported: {exc}", field="csr") from exc
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UnsupportedError(f"CSR signature algorithm is not supported: {exc}", field="csr") from exc
    if not valid:
        raise BadSignatureError("CSR signature does not verify (no proof of possession)", field="csr")
    try:
        subject = csr.subject
        der = csr.public_bytes(Encoding.DER)
    except ValueError as exc:
        raise BadRequestError(f"CSR subject is malformed: {exc}", field="csr") from exc
    return CsrRequest(subject=subject, public_key=public_key, der=der)
