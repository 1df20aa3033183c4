"""PKCS#10 certificate signing requests: parse, bound, and check the proof of possession.

The CSR's own signature is its proof of possession (RFC 2986); we verify it before anything else
looks at the request. Which keys and signature algorithms are accepted is one policy shared with
CRMF: :mod:`iotdlm.pki.pop`. Errors say what is wrong in the requester's words
(:func:`iotdlm.pki.der.describe_der_problem`), never a parser's debug text.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding

from iotdlm.errors import BadRequestError, BadSignatureError, TooLargeError, UnsupportedError
from iotdlm.pki import pop as pop_policy
from iotdlm.pki.der import describe_der_problem
from iotdlm.pki.keys import PublicKey

MAX_CSR_BYTES = 16 * 1024
_PEM_LABELS = ("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST")


@dataclass(frozen=True)
class CsrRequest:
    subject: x509.Name
    public_key: PublicKey
    der: bytes
    #: the extensions the CSR asks for (extensionRequest), as cryptography reads them
    requested_extensions: tuple[x509.Extension[x509.ExtensionType], ...] = ()
    #: the CSR asks for extensions that cannot be read (the CA issues without them, as always)
    unreadable_extensions: bool = False


def _unreadable(data: bytes) -> BadRequestError:
    return BadRequestError(f"CSR: {describe_der_problem(data, 'PKCS#10 request', pem_labels=_PEM_LABELS)}", field="csr")


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
        raise _unreadable(data) from exc


def parse_csr(data: bytes, *, max_bytes: int = MAX_CSR_BYTES) -> CsrRequest:
    """Parse a CSR and verify its self-signature (proof of possession of the private key)."""
    csr = load_csr(data, max_bytes=max_bytes)
    try:
        key = csr.public_key()
    except UnsupportedAlgorithm as exc:
        raise UnsupportedError("CSR public key algorithm is not supported", field="csr") from exc
    except ValueError as exc:  # bad encoding, a point not on its curve
        raise BadRequestError("CSR public key is not a valid key", field="csr") from exc
    try:
        pop_policy.check_request_key(key)
        assert isinstance(key, PublicKey)
        # the one POP policy (CRMF uses it too); cryptography then verifies under that algorithm
        pop_policy.check_pop_algorithm(key, csr.signature_algorithm_oid.dotted_string)
    except (UnsupportedError, BadSignatureError) as exc:
        raise type(exc)(f"CSR {exc.message}", field="csr") from exc
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UnsupportedError("CSR signature cannot be checked (malformed signature parameters)", field="csr") from exc
    if not valid:
        raise BadSignatureError("CSR signature does not verify (no proof of possession)", field="csr")
    try:
        subject = csr.subject
        # DER in is the DER out (cryptography's parser takes strict DER only, no trailing bytes):
        # only PEM is encoded again (issue 15: a km batch spent 1.6% of its CPU re-encoding)
        der = csr.public_bytes(Encoding.DER) if data.lstrip().startswith(b"-----BEGIN") else data
    except ValueError as exc:
        raise BadRequestError("CSR subject is malformed (an attribute value of the wrong type)", field="csr") from exc
    try:
        extensions: tuple[x509.Extension[x509.ExtensionType], ...] = tuple(csr.extensions)
        unreadable = False
    except Exception:  # cryptography raises assorted errors on hostile extensions: report, go on
        extensions, unreadable = (), True
    return CsrRequest(
        subject=subject,
        public_key=key,
        der=der,
        requested_extensions=extensions,
        unreadable_extensions=unreadable,
    )
