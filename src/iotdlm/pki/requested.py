"""What a certificate request asked for that the issued certificate does not carry.

The CA fills certificates from its profile, never from the request (deny by default). So a requester
who asked for a DNS name, a key usage or an ``L=`` attribute is told it was dropped instead of finding
out later. :func:`dropped` compares what the parsers already read (subject, extensions, CRMF template
fields) with the certificate; it costs nothing when the request asked for nothing beyond its subject.

This module is pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.x509.oid import ExtensionOID

__all__ = ["Requested", "dropped"]

_EXTENSION_NAMES: Final = {
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME: "subjectAltName",
    ExtensionOID.KEY_USAGE: "keyUsage",
    ExtensionOID.EXTENDED_KEY_USAGE: "extendedKeyUsage",
    ExtensionOID.BASIC_CONSTRAINTS: "basicConstraints",
    ExtensionOID.CERTIFICATE_POLICIES: "certificatePolicies",
    ExtensionOID.NAME_CONSTRAINTS: "nameConstraints",
    ExtensionOID.SUBJECT_KEY_IDENTIFIER: "subjectKeyIdentifier",
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER: "authorityKeyIdentifier",
    ExtensionOID.CRL_DISTRIBUTION_POINTS: "cRLDistributionPoints",
    ExtensionOID.AUTHORITY_INFORMATION_ACCESS: "authorityInfoAccess",
    ExtensionOID.ISSUER_ALTERNATIVE_NAME: "issuerAltName",
    ExtensionOID.TLS_FEATURE: "tlsFeature",
    ExtensionOID.OCSP_NO_CHECK: "ocspNoCheck",
    ExtensionOID.PRECERT_POISON: "precertPoison",
}


@dataclass(frozen=True)
class Requested:
    """What one request asked for, as its parser read it (PKCS#10 or CRMF)."""

    subject: x509.Name | None = None
    extensions: Sequence[x509.Extension[x509.ExtensionType]] = ()
    unreadable_extensions: bool = False
    #: CRMF template fields and message parts the CA does not take ("validity", "regInfo"...)
    template_fields: Sequence[str] = ()


def _extension_name(oid: x509.ObjectIdentifier) -> str:
    return _EXTENSION_NAMES.get(oid, oid.dotted_string)


def _general_name(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    if isinstance(name, x509.RFC822Name):
        return f"email:{name.value}"
    if isinstance(name, x509.DirectoryName):
        return f"dirName:{name.value.rfc4514_string()}"
    if isinstance(name, x509.RegisteredID):
        return f"RID:{name.value.dotted_string}"
    if isinstance(name, x509.OtherName):
        return f"otherName:{name.type_id.dotted_string}"
    return type(name).__name__  # pragma: no cover - cryptography has no other GeneralName


def _attribute(attr: x509.NameAttribute[str | bytes]) -> str:
    try:
        return attr.rfc4514_string()
    except (ValueError, TypeError):  # pragma: no cover - bytes values of unusual OIDs
        return attr.oid.dotted_string


def _san_of(ext: x509.Extension[x509.ExtensionType] | None) -> set[x509.GeneralName]:
    return set(ext.value) if ext is not None and isinstance(ext.value, x509.SubjectAlternativeName) else set()


def dropped(requested: Requested, certificate: x509.Certificate) -> tuple[str, ...]:
    """Each thing ``requested`` asked for that ``certificate`` does not carry, in the requester's words:
    ``"subject L=Plant 4"``, ``"subjectAltName DNS:dev.example.com"``, ``"extension keyUsage (the
    certificate carries the profile's)"``, ``"template validity"``."""
    out: list[str] = []
    if requested.subject is not None:
        issued = {(a.oid, a.value) for a in certificate.subject}
        out += [f"subject {_attribute(a)}" for a in requested.subject if (a.oid, a.value) not in issued]
    if requested.extensions:
        carried = {ext.oid: ext for ext in certificate.extensions}
        for ext in requested.extensions:
            name = _extension_name(ext.oid)
            have = carried.get(ext.oid)
            if isinstance(ext.value, x509.SubjectAlternativeName):
                names = _san_of(have)
                out += [f"{name} {_general_name(n)}" for n in ext.value if n not in names]
            elif have is None:
                out.append(f"extension {name}")
            elif have.value != ext.value or have.critical != ext.critical:
                out.append(f"extension {name} (the certificate carries the profile's)")
    if requested.unreadable_extensions:
        out.append("the requested extensions (not readable)")
    out += [f"{'CRMF' if f in ('controls', 'regInfo') else 'template'} {f}" for f in requested.template_fields]
    return tuple(out)
