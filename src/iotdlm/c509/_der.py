"""DER for the C509 re-encoding: walk a TLV, build a TLV, and the primitive values through pyasn1.

C509 (draft section 3) maps a DER certificate element by element, so the codec works on TLVs: it
needs the exact bytes of each element (the reverse mapping must give them back byte for byte),
which a decoded ASN.1 value does not keep. The walk is strict: definite, minimal lengths, no
trailing bytes. The primitive values (OBJECT IDENTIFIER, INTEGER, BIT STRING, character strings,
times) go through pyasn1's DER encoder and decoder, never hand-rolled.

Pure: no I/O.
"""

from __future__ import annotations

from typing import Final

from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import char, univ

SEQUENCE: Final = 0x30
SET: Final = 0x31
OID: Final = 0x06
INTEGER: Final = 0x02
BIT_STRING: Final = 0x03
OCTET_STRING: Final = 0x04
BOOLEAN: Final = 0x01
NULL: Final = 0x05
UTF8_STRING: Final = 0x0C
PRINTABLE_STRING: Final = 0x13
IA5_STRING: Final = 0x16
UTC_TIME: Final = 0x17
GENERALIZED_TIME: Final = 0x18

_STRINGS: Final = {UTF8_STRING: char.UTF8String, PRINTABLE_STRING: char.PrintableString, IA5_STRING: char.IA5String}


class DerError(ValueError):
    """The bytes are not the DER this element should be (worded for the caller's message)."""


def read_tlv(buf: bytes, pos: int = 0) -> tuple[int, bytes, int]:
    """The element at ``pos``: (tag, content, position after it). Single-byte tags only (all
    X.509 needs), definite minimal lengths."""
    if pos + 2 > len(buf):
        raise DerError("truncated element")
    tag, first = buf[pos], buf[pos + 1]
    if tag & 0x1F == 0x1F:
        raise DerError("multi-byte tags are not used in certificates")
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(buf):
            raise DerError("bad length")
        length = int.from_bytes(buf[pos : pos + count], "big")
        if length < 0x80 or buf[pos] == 0:
            raise DerError("length not in its shortest form (BER, not DER)")
        pos += count
    end = pos + length
    if end > len(buf):
        raise DerError("truncated element")
    return tag, buf[pos:end], end


def read_all(content: bytes) -> list[tuple[int, bytes]]:
    """Every element of a constructed element's content, in order."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(content):
        tag, value, pos = read_tlv(content, pos)
        out.append((tag, value))
    return out


def read_one(buf: bytes, tag: int | None = None) -> bytes:
    """The content of the single element ``buf`` holds (of ``tag``, if given)."""
    got, content, end = read_tlv(buf)
    if end != len(buf):
        raise DerError("trailing bytes after the element")
    if tag is not None and got != tag:
        raise DerError(f"expected tag 0x{tag:02x}, found 0x{got:02x}")
    return content


def tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def oid_content(dotted: str) -> bytes:
    """The content octets of an OBJECT IDENTIFIER: what an unwrapped CBOR OID (RFC 9090) holds."""
    return read_one(der_encoder.encode(univ.ObjectIdentifier(dotted)), OID)


def oid_dotted(content: bytes) -> str:
    """The dotted form of OID content octets; refuses what is not a well-formed OID."""
    if not content or content[-1] & 0x80:
        raise DerError("not an object identifier")
    try:
        value, rest = der_decoder.decode(tlv(OID, content), asn1Spec=univ.ObjectIdentifier())
    except PyAsn1Error as exc:
        raise DerError("not an object identifier") from exc
    if rest:
        raise DerError("not an object identifier")
    return str(value)


def integer(value: int) -> bytes:
    return bytes(der_encoder.encode(univ.Integer(value)))


def read_integer(content: bytes) -> int:
    """An INTEGER's content as a number; refuses non-minimal two's complement."""
    if not content or (len(content) > 1 and (content[0], content[1] & 0x80) in ((0, 0), (0xFF, 0x80))):
        raise DerError("integer not in its shortest form")
    return int.from_bytes(content, "big", signed=True)


def unsigned_bytes(value: int) -> bytes:
    """A non-negative integer as big-endian bytes without leading zeros (CBOR ~biguint)."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def text_string(tag: int, text: str) -> bytes:
    """A UTF8String, PrintableString or IA5String holding ``text`` (pyasn1 checks the alphabet)."""
    try:
        return bytes(der_encoder.encode(_STRINGS[tag](text)))
    except (PyAsn1Error, UnicodeError) as exc:
        raise DerError(f"{text!r} does not fit that string type") from exc


def read_text(tag: int, content: bytes) -> str:
    """The text of a UTF8String / PrintableString / IA5String element's content."""
    if tag not in _STRINGS:
        raise DerError(f"string type 0x{tag:02x} has no C509 text form")
    try:
        value, _ = der_decoder.decode(tlv(tag, content), asn1Spec=_STRINGS[tag]())
        return str(value)
    except (PyAsn1Error, UnicodeError) as exc:
        raise DerError("bad character string") from exc


def bit_string(bits: tuple[int, ...]) -> bytes:
    return bytes(der_encoder.encode(univ.BitString(bits)))


def read_bits(content: bytes) -> tuple[int, ...]:
    try:
        value, _ = der_decoder.decode(tlv(BIT_STRING, content), asn1Spec=univ.BitString())
    except PyAsn1Error as exc:
        raise DerError("bad bit string") from exc
    return tuple(value)
