"""Chain checks for certificates presented to us (module and device certificates).

Our chains are short and the anchors are our own issuing CAs, so the check is direct: issued by
the expected CA (signature and names), within validity, with the expected extended key usage.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from iotdlm.errors import BadRequestError, UntrustedError
from iotdlm.pki.der import describe_der_problem

MAX_CERT_BYTES = 16 * 1024


def load_certificate(data: bytes, *, max_bytes: int = MAX_CERT_BYTES) -> x509.Certificate:
    if len(data) > max_bytes:
        raise BadRequestError(f"certificate of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except (ValueError, x509.InvalidVersion) as exc:
        problem = describe_der_problem(data, "X.509 certificate", pem_labels=("CERTIFICATE",))
        raise BadRequestError(f"certificate: {problem}") from exc


def load_certificates_pem(data: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        if not data.strip():
            raise BadRequestError("certificate bundle: empty: no bytes given") from exc
        if data.lstrip()[:11] != b"-----BEGIN ":
            problem = describe_der_problem(data, "X.509 certificate")
            if problem.startswith("not DER"):  # text, base64
                problem = "no -----BEGIN CERTIFICATE----- line"
            else:
                problem = f"binary, not PEM (DER: {problem}; `openssl x509 -inform DER` converts DER to PEM)"
            raise BadRequestError(f"not a PEM certificate bundle: {problem}") from exc
        raise BadRequestError(
            "not a PEM certificate bundle: a -----BEGIN CERTIFICATE----- block is damaged or cut short "
            "(or none is there)"
        ) from exc
    return certs


def certs_to_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def verify_issued_by(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    *,
    now: dt.datetime,
    eku: ObjectIdentifier | None = ExtendedKeyUsageOID.CLIENT_AUTH,
) -> None:
    """Raise UntrustedError unless ``cert`` was issued by ``issuer``, is valid at ``now``, and has ``eku``."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError) as exc:
        raise UntrustedError(
            f"certificate {cert.subject.rfc4514_string()} is not issued by {issuer.subject.rfc4514_string()}"
        ) from exc
    except Exception as exc:  # InvalidSignature
        raise UntrustedError(
            f"certificate {cert.subject.rfc4514_string()} has a bad signature from {issuer.subject.rfc4514_string()}"
        ) from exc
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise UntrustedError(
            f"certificate {cert.subject.rfc4514_string()} is not valid at {now.isoformat()} "
            f"(valid {cert.not_valid_before_utc.isoformat()} to {cert.not_valid_after_utc.isoformat()})"
        )
    if eku is not None:
        try:
            ekus = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            raise UntrustedError(f"certificate {cert.subject.rfc4514_string()} has no extended key usage") from None
        if eku not in ekus:
            raise UntrustedError(
                f"certificate {cert.subject.rfc4514_string()} lacks extended key usage {eku.dotted_string}"
            )
