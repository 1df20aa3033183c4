"""A device's truststore after an EST ``/cacerts`` answer (RFC 7030 4.1.3; issue 16, ADR 0026): pure.

The device keeps the roots it has (a ``/cacerts`` answer never adds a root: rolling a root over
is not this) and takes, as its issuing CAs, exactly those of the answer that a root it holds
signed, that are CA certificates and valid now. So after a CA rotation it trusts the old and the
new issuing CA during the overlap, then only the new one -- the answer decides, within the
roots the device already trusts. An answer with no such CA changes nothing (RejectedError): the
device keeps the truststore it has.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509

from iotdlm.errors import UntrustedError
from iotdlm.pki.chain import der


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError):
        return False


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # InvalidSignature, ValueError, TypeError: not issued by it
        return False
    return True


def updated_truststore(
    current: Sequence[x509.Certificate], cacerts: Sequence[x509.Certificate], now: dt.datetime
) -> list[x509.Certificate]:
    """The truststore to install: the issuing CAs of ``cacerts`` that a root of ``current``
    signed (CA certificates, valid at ``now``) in place of those ``current`` holds, then the rest
    of ``current`` as it was (its roots last). UntrustedError if ``current`` holds no root or
    ``cacerts`` no such CA."""
    roots = [c for c in current if _is_ca(c) and _signed_by(c, c)]
    if not roots:
        raise UntrustedError("the device's truststore holds no root CA: it cannot judge a /cacerts answer")
    root_ders = {der(r) for r in roots}
    issuing: list[x509.Certificate] = []
    seen: set[bytes] = set()
    for cert in cacerts:
        d = der(cert)
        if d in root_ders or d in seen or not _is_ca(cert):
            continue
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            continue
        if any(_signed_by(cert, r) for r in roots):
            seen.add(d)
            issuing.append(cert)
    if not issuing:
        raise UntrustedError(
            "the /cacerts answer holds no issuing CA certificate signed by a root this device trusts; "
            "the truststore is left as it was"
        )
    # what is not an issuing CA under a held root (a transfer certificate, ...) stays as it was
    kept = [c for c in current if der(c) not in root_ders and not (_is_ca(c) and any(_signed_by(c, r) for r in roots))]
    return [*issuing, *kept, *roots]


def same_truststore(a: Sequence[x509.Certificate], b: Sequence[x509.Certificate]) -> bool:
    return sorted(der(c) for c in a) == sorted(der(c) for c in b)


__all__ = ["same_truststore", "updated_truststore"]
