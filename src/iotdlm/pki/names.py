"""Device ids, module identities and the names we put in certificates.

A device is named by its id (``CN`` and an ``urn:iotdlm:device:<id>`` URI SAN, which is what the RA
matches on); a module by ``urn:iotdlm:module:<module>`` (pm adds ``:dtype:<dtype>``: one pm per
device type, paper section 5.1.1).
"""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.x509.oid import NameOID

from iotdlm.errors import BadRequestError

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEVICE_URN = "urn:iotdlm:device:"
MODULE_URN = "urn:iotdlm:module:"


def check_id(value: str, what: str = "device id") -> str:
    """Device ids and dtypes: 1-64 of ``A-Za-z0-9._-``, starting with a letter or digit."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise BadRequestError(
            f"{what} {value!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            field=what.replace(" ", "_"),
        )
    return value


def device_uri(device_id: str) -> str:
    return DEVICE_URN + check_id(device_id)


def module_uri(module: str, dtype: str | None = None) -> str:
    uri = MODULE_URN + check_id(module, "module")
    if dtype is not None:
        uri += ":dtype:" + check_id(dtype, "dtype")
    return uri


def device_subject(device_id: str, organization: str, unit: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, device_id),
            x509.NameAttribute(NameOID.COMMON_NAME, device_id),
        ]
    )


def uris_of(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


def device_id_of(cert: x509.Certificate) -> str | None:
    """The device id a certificate names in its URI SAN, or None."""
    for uri in uris_of(cert):
        if uri.startswith(DEVICE_URN):
            return uri[len(DEVICE_URN) :]
    return None


def module_of(cert: x509.Certificate) -> tuple[str, str | None] | None:
    """(module, dtype or None) a service certificate names in its URI SAN, or None."""
    for uri in uris_of(cert):
        if uri.startswith(MODULE_URN):
            rest = uri[len(MODULE_URN) :]
            if ":dtype:" in rest:
                module, dtype = rest.split(":dtype:", 1)
                return module, dtype
            return rest, None
    return None
