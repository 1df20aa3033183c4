"""Device ids, module identities and the names we put in certificates -- built and parsed HERE only.

Names are RFC 9039 device URNs under the operator's IANA Private Enterprise Number (PEN, set at
``iotdlm init --enterprise-number``; the default 32473 is RFC 5612's documentation number):

- a device: ``urn:dev:org:<PEN>-<device id>`` (its URI SAN, which the RA matches on; the subject
  carries the id as CN and serialNumber, IEEE 802.1AR style);
- a module: ``urn:dev:org:<PEN>-module:<module>`` and, for pm (one per device type, paper section
  5.1.1), ``urn:dev:org:<PEN>-module:pm:<dtype>``.

RFC 9039's ``org`` body is ``posnumber "-" identifier *(":" identifier)`` with ``identifier =
1*(ALPHA / DIGIT / "." / "-")``: a device URN has exactly one identifier, a module URN starts with
the identifier ``module``. Device ids and dtypes may also hold ``_``, which an RFC 9039 identifier
cannot: such a label (and one that itself starts with ``x--``) is written ``x--`` + the lowercase
hex of its ASCII, the way IDNA marks its encoded labels with ``xn--``. Every id has exactly one URN.

Certificates issued before this naming carry ``urn:iotdlm:device:<id>`` and ``urn:iotdlm:module:
<module>[:dtype:<dtype>]``; the parsers still accept them (a factory certificate lives 20 years),
nothing builds them any more. Parsing accepts any PEN: which certificates are ours is decided by
the issuing CA, and another provider's factory certificates (trust transfer) name its own PEN.

Factory certificates also carry RFC 4108's hardwareModuleName other name (``hwType`` an OID under
the operator's arc naming the device type, ``hwSerialNum`` the device id).
"""

from __future__ import annotations

import functools
import hashlib
import re

from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import univ

from iotdlm.errors import BadRequestError

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: RFC 9039 ``identifier``
_IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9.-]+$")
_ORG_RE = re.compile(r"^urn:dev:org:([1-9][0-9]{0,9})-(.+)$", re.IGNORECASE)
_ACE = "x--"
_MODULE = "module"

#: RFC 5612's documentation PEN: the default until the operator sets their own
DEFAULT_ENTERPRISE_NUMBER = 32473
MAX_ENTERPRISE_NUMBER = 2**32 - 1
#: arcs under ``1.3.6.1.4.1.<PEN>``: certificate policies (one per profile), hardware types
POLICY_ARC = 1
HW_TYPE_ARC = 2

LEGACY_DEVICE_URN = "urn:iotdlm:device:"
LEGACY_MODULE_URN = "urn:iotdlm:module:"

#: id-on-hardwareModuleName (RFC 4108 5); pyasn1-modules' rfc4108 is loaded only to parse one (~0.15 s)
HARDWARE_MODULE_NAME = ObjectIdentifier("1.3.6.1.5.5.7.8.4")


def check_id(value: str, what: str = "device id") -> str:
    """Device ids and dtypes: 1-64 of ``A-Za-z0-9._-``, starting with a letter or digit."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise BadRequestError(
            f"{what} {value!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            field=what.replace(" ", "_"),
        )
    return value


def check_enterprise_number(value: object) -> int:
    """An IANA Private Enterprise Number: a positive integer below 2**32."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ENTERPRISE_NUMBER:
        raise BadRequestError(
            f"enterprise number {value!r} is not valid: use your IANA Private Enterprise Number "
            f"(1 to {MAX_ENTERPRISE_NUMBER})",
            field="enterprise_number",
        )
    return value


def enterprise_arc(enterprise_number: int) -> str:
    """``1.3.6.1.4.1.<PEN>``: the operator's OID arc."""
    return f"1.3.6.1.4.1.{check_enterprise_number(enterprise_number)}"


def _label(value: str) -> str:
    """An id as one RFC 9039 identifier (see the module docstring)."""
    if "_" in value or value.startswith(_ACE):
        return _ACE + value.encode("ascii").hex()
    return value


def _unlabel(text: str) -> str | None:
    """The id one identifier names, or None if it is not one we would have written."""
    if not _IDENTIFIER_RE.match(text):
        return None
    if text.startswith(_ACE):
        hexpart = text[len(_ACE) :]
        if not re.fullmatch(r"(?:[0-9a-f]{2})+", hexpart):
            return None
        value = bytes.fromhex(hexpart).decode("latin-1")
        if _label(value) != text:  # only the canonical spelling
            return None
    else:
        value = text
    return value if _ID_RE.match(value) else None


def device_uri(device_id: str, *, enterprise_number: int) -> str:
    return f"urn:dev:org:{check_enterprise_number(enterprise_number)}-{_label(check_id(device_id))}"


def module_uri(module: str, dtype: str | None = None, *, enterprise_number: int) -> str:
    uri = f"urn:dev:org:{check_enterprise_number(enterprise_number)}-{_MODULE}:{_label(check_id(module, 'module'))}"
    if dtype is not None:
        uri += ":" + _label(check_id(dtype, "dtype"))
    return uri


def _org_identifiers(uri: str) -> list[str] | None:
    m = _ORG_RE.match(uri)
    if m is None or int(m.group(1)) > MAX_ENTERPRISE_NUMBER:
        return None
    return m.group(2).split(":")


def parse_device_uri(uri: str) -> str | None:
    """The device id a URI names (RFC 9039 form under any PEN, or the legacy form), else None."""
    parts = _org_identifiers(uri)
    if parts is not None:
        return _unlabel(parts[0]) if len(parts) == 1 else None
    if uri.startswith(LEGACY_DEVICE_URN):
        rest = uri[len(LEGACY_DEVICE_URN) :]
        return rest if _ID_RE.match(rest) else None
    return None


def parse_module_uri(uri: str) -> tuple[str, str | None] | None:
    """(module, dtype or None) a URI names (RFC 9039 form under any PEN, or the legacy form), else None."""
    parts = _org_identifiers(uri)
    if parts is not None:
        if parts[0] != _MODULE or len(parts) not in (2, 3):
            return None
        module = _unlabel(parts[1])
        dtype = _unlabel(parts[2]) if len(parts) == 3 else None
        if module is None or (len(parts) == 3 and dtype is None):
            return None
        return module, dtype
    if uri.startswith(LEGACY_MODULE_URN):
        rest = uri[len(LEGACY_MODULE_URN) :]
        module, sep, dtype = rest.partition(":dtype:")
        if not _ID_RE.match(module) or (sep and not _ID_RE.match(dtype)):
            return None
        return module, (dtype if sep else None)
    return None


#: X.520 serialNumber is a PrintableString (RFC 5280 appendix A.1), which has no "_"
_PRINTABLE_RE = re.compile(r"^[A-Za-z0-9 '()+,\-./:=?]+$")


def device_subject(device_id: str, organization: str, unit: str) -> x509.Name:
    """O, OU (the device type), serialNumber (IEEE 802.1AR; only when the id is a PrintableString,
    i.e. holds no "_") and CN: the device id."""
    attrs = [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
    ]
    if _PRINTABLE_RE.match(device_id):
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, device_id))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, device_id))
    return x509.Name(attrs)


def hw_type(enterprise_number: int, dtype: str | None) -> ObjectIdentifier:
    """The hwType OID naming a device type: ``1.3.6.1.4.1.<PEN>.2.<n>``, ``n`` the first four
    octets of SHA-256(dtype) as an integer (stable, no registry to keep), 0 for an unknown type."""
    n = 0 if dtype is None else int.from_bytes(hashlib.sha256(check_id(dtype, "dtype").encode()).digest()[:4], "big")
    return ObjectIdentifier(f"{enterprise_arc(enterprise_number)}.{HW_TYPE_ARC}.{n}")


def hardware_module_name(hw_type_oid: ObjectIdentifier, serial: bytes) -> x509.OtherName:
    """RFC 4108 hardwareModuleName as a SAN other name:
    ``SEQUENCE { hwType OBJECT IDENTIFIER, hwSerialNum OCTET STRING }``.

    The hwType's DER is pyasn1's, once per type; the serial's OCTET STRING and the SEQUENCE around
    both are two definite-length headers put in front of the bytes (issue 15: pyasn1's encoder for
    every device certificate was 5% of km's CPU per certificate). tests/unit/test_pki_ca.py checks
    the bytes equal pyasn1's encoding of the whole structure for any serial and type.
    """
    value = _hw_type_der(hw_type_oid) + _der_tlv(_OCTET_STRING, serial)
    return x509.OtherName(HARDWARE_MODULE_NAME, _der_tlv(_SEQUENCE, value))


_SEQUENCE = 0x30
_OCTET_STRING = 0x04


@functools.lru_cache(maxsize=256)
def _hw_type_der(hw_type_oid: ObjectIdentifier) -> bytes:
    return bytes(der_encoder.encode(univ.ObjectIdentifier(hw_type_oid.dotted_string)))


def _der_tlv(tag: int, value: bytes) -> bytes:
    """A universal DER element: tag, definite length (short form below 128, else long form), value."""
    n = len(value)
    if n < 0x80:
        return bytes((tag, n)) + value
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + value


def parse_hardware_module_name(value: bytes) -> tuple[ObjectIdentifier, bytes]:
    """(hwType, hwSerialNum) of a DER hardwareModuleName; BadRequestError if it is not one."""
    from pyasn1_modules import rfc4108

    try:
        decoded, rest = der_decoder.decode(value, asn1Spec=rfc4108.HardwareModuleName())
        if rest:
            raise BadRequestError("hardwareModuleName has trailing bytes")
        return ObjectIdentifier(str(decoded["hwType"])), bytes(decoded["hwSerialNum"])
    except (PyAsn1Error, ValueError) as exc:
        raise BadRequestError("hardwareModuleName is not a valid RFC 4108 HardwareModuleName") from exc


def device_names(
    device_id: str, *, enterprise_number: int, dtype: str | None = None, hardware_module: bool = False
) -> list[x509.GeneralName]:
    """The SAN of a device certificate: its device URN and, for an 802.1AR-style factory identity,
    its hardwareModuleName."""
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(device_uri(device_id, enterprise_number=enterprise_number))
    ]
    if hardware_module:
        names.append(hardware_module_name(hw_type(enterprise_number, dtype), device_id.encode("ascii")))
    return names


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def uris_of(cert: x509.Certificate) -> list[str]:
    san = _san(cert)
    return [] if san is None else [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


def hardware_modules_of(cert: x509.Certificate) -> list[tuple[ObjectIdentifier, bytes]]:
    """(hwType, hwSerialNum) of every hardwareModuleName in a certificate's SAN."""
    san = _san(cert)
    if san is None:
        return []
    return [
        parse_hardware_module_name(o.value)
        for o in san.get_values_for_type(x509.OtherName)
        if o.type_id == HARDWARE_MODULE_NAME
    ]


def device_id_of(cert: x509.Certificate) -> str | None:
    """The device id a certificate names in its URI SAN, or None."""
    for uri in uris_of(cert):
        found = parse_device_uri(uri)
        if found is not None:
            return found
    return None


def module_of(cert: x509.Certificate) -> tuple[str, str | None] | None:
    """(module, dtype or None) a service certificate names in its URI SAN, or None."""
    for uri in uris_of(cert):
        found = parse_module_uri(uri)
        if found is not None:
            return found
    return None
