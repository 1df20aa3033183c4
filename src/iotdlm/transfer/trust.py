"""Certificate checks of trust transfer (pure): a signer's chain up to an anchor of a truststore,
a pinned certificate, and the device id a factory certificate names."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from iotdlm.errors import BadRequestError, UntrustedError
from iotdlm.pki.chain import load_certificate
from iotdlm.pki.keys import PublicKey, check_public_key
from iotdlm.pki.names import check_id, device_id_of, module_of

#: the module name in the URI SAN of a provider's transfer signing certificate
#: (``urn:dev:org:<PEN>-module:transfer``): the only service certificate a device takes transfer messages from
TRANSFER_MODULE = "transfer"
MAX_DEPTH = 4


def cert_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def spki_sha256(cert: x509.Certificate) -> str:
    """SHA-256 (hex) of a certificate's SubjectPublicKeyInfo: names a signing key across re-issues."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def parse_certificates(ders: Sequence[bytes], *, what: str) -> list[x509.Certificate]:
    out = []
    for i, d in enumerate(ders):
        try:
            out.append(load_certificate(d))
        except BadRequestError as exc:
            raise BadRequestError(f"{what} #{i}: {exc.message}") from exc
    return out


def public_key(cert: x509.Certificate) -> PublicKey:
    try:
        return check_public_key(cert.public_key())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UntrustedError(f"certificate {_name(cert)} has a key we cannot use: {exc}") from exc


def _name(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string()
    except ValueError:
        return "(unreadable subject)"


def _valid_at(cert: x509.Certificate, now: dt.datetime) -> None:
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise UntrustedError(
            f"certificate {_name(cert)} is not valid at {now.isoformat()} (valid "
            f"{cert.not_valid_before_utc.isoformat()} to {cert.not_valid_after_utc.isoformat()})"
        )


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm
        return False
    return True


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError):
        return False


def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    *,
    now: dt.datetime,
) -> x509.Certificate:
    """The anchor ``leaf`` chains to (through ``intermediates``, each a CA), every certificate valid
    at ``now``; UntrustedError otherwise. An anchor is trusted as it is (it is in the truststore)."""
    anchor_ders = {cert_der(a) for a in anchors}
    current = leaf
    for _ in range(MAX_DEPTH + 1):
        if cert_der(current) in anchor_ders:
            return current
        _valid_at(current, now)
        for anchor in anchors:
            if _issued_by(current, anchor):
                _valid_at(anchor, now)
                return anchor
        step = next((c for c in intermediates if is_ca(c) and _issued_by(current, c)), None)
        if step is None:
            raise UntrustedError(f"certificate {_name(current)} does not chain to a trusted root")
        current = step
    raise UntrustedError(f"the chain of {_name(leaf)} is longer than {MAX_DEPTH} certificates")


def check_transfer_signer(cert: x509.Certificate) -> None:
    """A provider's transfer messages are signed by its transfer identity, nothing else it holds."""
    try:
        ident = module_of(cert)
    except ValueError as exc:
        raise UntrustedError(f"signer certificate has a malformed extension: {exc}") from exc
    if ident != (TRANSFER_MODULE, None):
        raise UntrustedError(
            f"certificate {_name(cert)} is not a transfer signing identity (urn:dev:org:<PEN>-module:{TRANSFER_MODULE})"
        )


def check_pinned(cert_der_bytes: bytes, pinned: x509.Certificate, *, now: dt.datetime, what: str) -> None:
    """The agreed identity of the peer provider: exactly the certificate pinned in the agreement."""
    if cert_der_bytes != cert_der(pinned):
        raise UntrustedError(f"{what} is not signed with the agreed certificate of the peer provider")
    _valid_at(pinned, now)


def factory_device_id(cert: x509.Certificate) -> str:
    """The device id a factory certificate names: its device URN (``urn:dev:org:<PEN>-<id>`` under
    any PEN, or the legacy ``urn:iotdlm:device:<id>``), else its subject serialNumber, else its CN
    (another factory's certificates may not carry our URN)."""
    try:
        found = device_id_of(cert)
        if found is None:
            for oid in (NameOID.SERIAL_NUMBER, NameOID.COMMON_NAME):
                attrs = cert.subject.get_attributes_for_oid(oid)
                if attrs:
                    value = attrs[0].value
                    found = value if isinstance(value, str) else None
                    break
    except ValueError as exc:
        raise BadRequestError("factory certificate has a malformed name or SAN: not valid DER") from exc
    if found is None:
        raise BadRequestError(f"factory certificate {_name(cert)} names no device (no device URI, serialNumber or CN)")
    return check_id(found)
