"""C509 Name and SpecialText (draft section 3.1 "issuer"): DER Name <-> CBOR, both ways.

- An RDN holds one attribute (multi-valued RDNs are not supported by C509).
- A registered attribute with a UTF8String value is ``+n``, with a PrintableString ``-n``; the
  IA5String-only attributes (emailAddress, domainComponent) are ``+n`` with an IA5String.
- Anything else (another OID, another string type) is ``(~oid, bytes)``: the OID's content
  octets and the value's whole DER element -- lossless.
- SpecialText: an even-length lowercase hex string becomes bytes; an EUI-64 written
  ``HH-HH-HH-HH-HH-HH-HH-HH`` becomes tag 48 (6 bytes when it is ``..-FF-FE-..``, the MAC-48 form).
- A Name that is one UTF8 commonName is just its SpecialText.

Pure: no I/O.
"""

from __future__ import annotations

import re
from typing import Any, Final

from cbor2 import CBORTag

from iotdlm.c509 import _der, registry
from iotdlm.c509._der import DerError

_ATTR_BY_OID: Final = registry.inverse(registry.RDN_ATTRIBUTES)
_HEX: Final = re.compile(r"^(?:[0-9a-f]{2})+$")
_EUI64: Final = re.compile(r"^[0-9A-F]{2}(?:-[0-9A-F]{2}){7}$")
MAC_TAG: Final = 48
COMMON_NAME: Final = 1


def is_int(value: object) -> bool:
    """A CBOR integer (Python's bool is an int: a CBOR true is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def encode_text(text: str) -> str | bytes | CBORTag:
    if len(text) >= 2 and _HEX.match(text):
        return bytes.fromhex(text)
    if _EUI64.match(text):
        octets = bytes.fromhex(text.replace("-", ""))
        if octets[3:5] == b"\xff\xfe":
            return CBORTag(MAC_TAG, octets[:3] + octets[5:])
        return CBORTag(MAC_TAG, octets)
    return text


def decode_text(item: object) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, bytes) and item:
        return item.hex()
    if isinstance(item, CBORTag) and item.tag == MAC_TAG and isinstance(item.value, bytes):
        octets = item.value
        if len(octets) == 6:
            octets = octets[:3] + b"\xff\xfe" + octets[3:]
        if len(octets) == 8:
            return "-".join(f"{b:02X}" for b in octets)
    raise DerError("an attribute value must be text, non-empty bytes or a tag-48 MAC address")


def _encode_attribute(atv: bytes) -> list[Any]:
    (t_tag, t_content), (v_tag, v_content) = _der.read_all(atv)
    if t_tag != _der.OID:
        raise DerError("attribute type is not an OID")
    number = _ATTR_BY_OID.get(_der.oid_dotted(t_content))
    value_der = _der.tlv(v_tag, v_content)
    if number is not None:
        try:
            text = _der.read_text(v_tag, v_content)
        except DerError:
            text = None
        if text is not None and _der.text_string(v_tag, text) == value_der:
            if number in registry.IA5_ATTRIBUTES:
                if v_tag == _der.IA5_STRING:
                    return [number, encode_text(text)]
            elif v_tag == _der.UTF8_STRING:
                return [number, encode_text(text)]
            elif v_tag == _der.PRINTABLE_STRING:
                return [-number, encode_text(text)]
    return [t_content, value_der]


def encode_name(name_der: bytes) -> Any:
    """A DER Name element -> its C509 form (refuses multi-valued RDNs)."""
    pairs: list[Any] = []
    for tag, rdn in _der.read_all(_der.read_one(name_der, _der.SEQUENCE)):
        atvs = _der.read_all(rdn)
        if tag != _der.SET or len(atvs) != 1 or atvs[0][0] != _der.SEQUENCE:
            raise DerError("a relative distinguished name with more than one attribute has no C509 form")
        pairs += _encode_attribute(atvs[0][1])
    if len(pairs) == 2 and pairs[0] == COMMON_NAME:
        return pairs[1]
    return pairs


def _decode_attribute(kind: object, value: object) -> bytes:
    if isinstance(kind, bytes):
        if not isinstance(value, bytes):
            raise DerError("an attribute named by OID must carry bytes")
        _der.read_one(value)
        return _der.tlv(_der.SEQUENCE, _der.tlv(_der.OID, _der.oid_content(_der.oid_dotted(kind))) + value)
    if not is_int(kind):
        raise DerError("an attribute type must be an int or an OID")
    assert isinstance(kind, int)
    number = abs(kind)
    if number not in registry.RDN_ATTRIBUTES:
        raise DerError(f"attribute type {kind} is not in the C509 RDN Attributes registry")
    if number in registry.IA5_ATTRIBUTES:
        if kind < 0:
            raise DerError(f"attribute type {number} is always an IA5String: it has no negative form")
        tag = _der.IA5_STRING
    else:
        tag = _der.PRINTABLE_STRING if kind < 0 else _der.UTF8_STRING
    oid = _der.tlv(_der.OID, _der.oid_content(registry.RDN_ATTRIBUTES[number]))
    return _der.tlv(_der.SEQUENCE, oid + _der.text_string(tag, decode_text(value)))


def decode_name(item: object) -> bytes:
    """A C509 Name -> the DER Name element."""
    if isinstance(item, str | bytes | CBORTag):
        item = [COMMON_NAME, item]
    if not isinstance(item, list) or len(item) % 2:
        raise DerError("a name must be an array of (type, value) pairs or a single text")
    rdns = b"".join(_der.tlv(_der.SET, _decode_attribute(item[i], item[i + 1])) for i in range(0, len(item), 2))
    return _der.tlv(_der.SEQUENCE, rdns)
