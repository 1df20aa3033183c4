"""C509 extensions (draft sections 3.1 "extensions" and 3.3): DER Extensions <-> CBOR.

An extension whose value has a C509 form (subjectKeyIdentifier, keyUsage, subjectAltName,
basicConstraints, cRLDistributionPoints, certificatePolicies, authorityKeyIdentifier,
extKeyUsage, authorityInfoAccess, freshestCRL, ocsp-nocheck: every extension our profiles put in a
certificate) is ``(+-id, value)``, negative when critical. Every value is encoded, decoded again
and compared with its DER before it is used; a value whose specific form would not give back the
same bytes (a reasons field, an IA5String with non-ASCII, ...) and every other extension are
carried as the draft's fallback: ``(~oid, bytes)``, or ``(~oid, [bytes])`` when critical.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from iotdlm.c509 import _der, names, registry
from iotdlm.c509._der import DerError

_BY_OID: Final = registry.inverse(registry.EXTENSIONS)
_EKU_BY_OID: Final = registry.inverse(registry.EXTENDED_KEY_USAGES)
_CP_BY_OID: Final = registry.inverse(registry.CERTIFICATE_POLICIES)
_PQ_BY_OID: Final = registry.inverse(registry.POLICY_QUALIFIERS)
_IA_BY_OID: Final = registry.inverse(registry.INFORMATION_ACCESS)
_HW_MODULE_NAME: Final = "1.3.6.1.5.5.7.8.4"
_KEY_USAGE: Final = 2
_TRUE: Final = _der.tlv(_der.BOOLEAN, b"\xff")
_URI: Final = 0x86
#: GeneralName: C509 General Names value -> (DER tag, text?) for the primitive choices
_GN_TEXT: Final = {1: 0x81, 2: 0x82, 6: _URI}
_GN_BY_TAG: Final = {v: k for k, v in _GN_TEXT.items()}


def _oid_or_int(content: bytes, table: dict[str, int]) -> int | bytes:
    number = table.get(_der.oid_dotted(content))
    return content if number is None else number


def _oid_from(item: object, table: dict[int, str]) -> bytes:
    if names.is_int(item):
        assert isinstance(item, int)
        if item not in table:
            raise DerError(f"{item} is not in the C509 registry here")
        return _der.oid_content(table[item])
    if isinstance(item, bytes):
        return _der.oid_content(_der.oid_dotted(item))
    raise DerError("expected an int or an OID")


def _as(kind: type, item: object) -> Any:
    if not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
        raise DerError(f"expected {kind.__name__}")
    return item


# --- GeneralName / GeneralNames ----------------------------------------------------------------
def _encode_general_name(tag: int, content: bytes) -> list[Any]:
    if tag in _GN_BY_TAG:
        return [_GN_BY_TAG[tag], _der.read_text(_der.IA5_STRING, content)]
    if tag == 0x87:
        return [7, content]
    if tag == 0x88:
        _der.oid_dotted(content)
        return [8, content]
    if tag == 0xA4:
        return [4, names.encode_name(_der.tlv(_der.SEQUENCE, _der.read_one(content, _der.SEQUENCE)))]
    if tag == 0xA0:
        (t_oid, oid), (t_val, inner) = _der.read_all(content)
        if t_oid != _der.OID or t_val != 0xA0:
            raise DerError("bad otherName")
        if _der.oid_dotted(oid) == _HW_MODULE_NAME:
            (t_hw, hw), (t_sn, sn) = _der.read_all(_der.read_one(inner, _der.SEQUENCE))
            if t_hw != _der.OID or t_sn != _der.OCTET_STRING:
                raise DerError("bad hardwareModuleName")
            return [-1, [hw, sn]]
        return [0, [oid, inner]]
    raise DerError(f"general name [{tag & 0x1F}] has no C509 form")


def _decode_general_name(kind: object, value: object) -> bytes:
    kind = _as(int, kind)
    if kind in _GN_TEXT:
        return _der.tlv(_GN_TEXT[kind], _der.read_one(_der.text_string(_der.IA5_STRING, _as(str, value))))
    if kind == 7:
        return _der.tlv(0x87, _as(bytes, value))
    if kind == 8:
        return _der.tlv(0x88, _oid_from(_as(bytes, value), {}))
    if kind == 4:
        return _der.tlv(0xA4, names.decode_name(value))
    if kind in (-1, 0):
        first, second = _as(list, value)
        if kind == -1:
            inner = _der.tlv(
                _der.SEQUENCE, _der.tlv(_der.OID, _oid_from(first, {})) + _der.tlv(0x04, _as(bytes, second))
            )
            oid = _der.oid_content(_HW_MODULE_NAME)
        else:
            oid, inner = _oid_from(first, {}), _as(bytes, second)
            _der.read_one(inner)
        return _der.tlv(0xA0, _der.tlv(_der.OID, oid) + _der.tlv(0xA0, inner))
    raise DerError(f"general name type {kind} is not supported")


def _encode_general_names(content: bytes) -> list[Any]:
    return [x for tag, c in _der.read_all(content) for x in _encode_general_name(tag, c)]


def _decode_general_names(item: object) -> bytes:
    flat = _as(list, item)
    if not flat or len(flat) % 2:
        raise DerError("general names must be (type, value) pairs")
    return b"".join(_decode_general_name(flat[i], flat[i + 1]) for i in range(0, len(flat), 2))


# --- the extension values -------------------------------------------------------------------------
def _enc_san(value: bytes) -> Any:
    flat = _encode_general_names(_der.read_one(value, _der.SEQUENCE))
    return flat[1] if len(flat) == 2 and flat[0] == 2 else flat


def _dec_san(item: object) -> bytes:
    return _der.tlv(_der.SEQUENCE, _decode_general_names([2, item] if isinstance(item, str) else item))


def _enc_key_usage(value: bytes) -> int:
    return sum(bit << i for i, bit in enumerate(_der.read_bits(_der.read_one(value, _der.BIT_STRING))))


def _dec_key_usage(item: object) -> bytes:
    n = _as(int, item)
    if n < 0 or n >= 1 << 16:
        raise DerError("keyUsage out of range")
    return _der.bit_string(tuple((n >> i) & 1 for i in range(n.bit_length())))


def _enc_basic_constraints(value: bytes) -> int:
    parts = _der.read_all(_der.read_one(value, _der.SEQUENCE))
    if not parts:
        return -2
    if _der.tlv(*parts[0]) != _TRUE:
        raise DerError("basicConstraints with cA FALSE and a path length has no C509 form")
    if len(parts) == 1:
        return -1
    (tag, n), *rest = parts[1:]
    if tag != _der.INTEGER or rest or _der.read_integer(n) < 0:
        raise DerError("bad pathLenConstraint")
    return _der.read_integer(n)


def _dec_basic_constraints(item: object) -> bytes:
    n = _as(int, item)
    if n == -2:
        return _der.tlv(_der.SEQUENCE, b"")
    if n == -1:
        return _der.tlv(_der.SEQUENCE, _TRUE)
    if n < 0:
        raise DerError("basicConstraints must be -2, -1 or a path length")
    return _der.tlv(_der.SEQUENCE, _TRUE + _der.integer(n))


def _uris(content: bytes) -> list[str]:
    out = []
    for tag, c in _der.read_all(content):
        if tag != _URI:
            raise DerError("only URIs have a C509 form here")
        out.append(_der.read_text(_der.IA5_STRING, c))
    return out


def _enc_crl_dp(value: bytes) -> Any:
    points: list[Any] = []
    for tag, dp in _der.read_all(_der.read_one(value, _der.SEQUENCE)):
        parts = _der.read_all(dp)
        if tag != _der.SEQUENCE or len(parts) != 1 or parts[0][0] != 0xA0:
            raise DerError("only a distributionPoint fullName has a C509 form here")
        uris = _uris(_der.read_one(parts[0][1], 0xA0))
        points.append([uris[0] if len(uris) == 1 else uris, None, None])
    if len(points) == 1 and isinstance(points[0][0], str):
        return points[0][0]
    return points


def _dec_crl_dp(item: object) -> bytes:
    points = [[item, None, None]] if isinstance(item, str) else _as(list, item)
    out = b""
    for point in points:
        full, reasons, issuer = _as(list, point)
        if reasons is not None or issuer is not None:
            raise DerError("reasons and cRLIssuer are not supported here")
        uris = [full] if isinstance(full, str) else _as(list, full)
        gns = _decode_general_names([x for u in uris for x in (6, u)])
        out += _der.tlv(_der.SEQUENCE, _der.tlv(0xA0, _der.tlv(0xA0, gns)))
    return _der.tlv(_der.SEQUENCE, out)


def _enc_policies(value: bytes) -> list[Any]:
    flat: list[Any] = []
    for _, info in _der.read_all(_der.read_one(value, _der.SEQUENCE)):
        (t_oid, oid), *quals = _der.read_all(info)
        if t_oid != _der.OID or len(quals) > 1 or (quals and quals[0][0] != _der.SEQUENCE):
            raise DerError("bad policy information")
        qualifiers: list[Any] = []
        for _, q in _der.read_all(quals[0][1]) if quals else []:
            (t_q, q_oid), (t_v, text) = _der.read_all(q)
            if t_q != _der.OID or t_v != _der.IA5_STRING or _der.oid_dotted(q_oid) not in _PQ_BY_OID:
                raise DerError("only CPS qualifiers have a C509 form here")
            qualifiers += [_PQ_BY_OID[_der.oid_dotted(q_oid)], _der.read_text(t_v, text)]
        flat += [_oid_or_int(oid, _CP_BY_OID), qualifiers]
    return flat


def _dec_policies(item: object) -> bytes:
    flat = _as(list, item)
    if not flat or len(flat) % 2:
        raise DerError("certificatePolicies must be (policy, qualifiers) pairs")
    out = b""
    for i in range(0, len(flat), 2):
        quals = _as(list, flat[i + 1])
        qs = b"".join(
            _der.tlv(
                _der.SEQUENCE,
                _der.tlv(_der.OID, _oid_from(quals[j], registry.POLICY_QUALIFIERS))
                + _der.text_string(_der.IA5_STRING, _as(str, quals[j + 1])),
            )
            for j in range(0, len(quals), 2)
        )
        body = _der.tlv(_der.OID, _oid_from(flat[i], registry.CERTIFICATE_POLICIES))
        out += _der.tlv(_der.SEQUENCE, body + (_der.tlv(_der.SEQUENCE, qs) if quals else b""))
    return _der.tlv(_der.SEQUENCE, out)


def _enc_aki(value: bytes) -> bytes:
    return _der.read_one(_der.read_one(value, _der.SEQUENCE), 0x80)


def _dec_aki(item: object) -> bytes:
    return _der.tlv(_der.SEQUENCE, _der.tlv(0x80, _as(bytes, item)))


def _enc_eku(value: bytes) -> Any:
    ids = [_oid_or_int(c, _EKU_BY_OID) for _, c in _der.read_all(_der.read_one(value, _der.SEQUENCE))]
    return ids[0] if len(ids) == 1 else ids


def _dec_eku(item: object) -> bytes:
    ids = item if isinstance(item, list) else [item]
    return _der.tlv(
        _der.SEQUENCE, b"".join(_der.tlv(_der.OID, _oid_from(i, registry.EXTENDED_KEY_USAGES)) for i in ids)
    )


def _enc_aia(value: bytes) -> list[Any]:
    flat: list[Any] = []
    for _, desc in _der.read_all(_der.read_one(value, _der.SEQUENCE)):
        (t_oid, oid), (t_gn, uri) = _der.read_all(desc)
        if t_oid != _der.OID or t_gn != _URI:
            raise DerError("only URI access locations have a C509 form")
        flat += [_oid_or_int(oid, _IA_BY_OID), _der.read_text(_der.IA5_STRING, uri)]
    return flat


def _dec_aia(item: object) -> bytes:
    flat = _as(list, item)
    if not flat or len(flat) % 2:
        raise DerError("authorityInfoAccess must be (method, uri) pairs")
    return _der.tlv(
        _der.SEQUENCE,
        b"".join(
            _der.tlv(
                _der.SEQUENCE,
                _der.tlv(_der.OID, _oid_from(flat[i], registry.INFORMATION_ACCESS))
                + _decode_general_name(6, flat[i + 1]),
            )
            for i in range(0, len(flat), 2)
        ),
    )


def _enc_null(value: bytes) -> None:
    if value != b"\x05\x00":
        raise DerError("ocsp-nocheck must be NULL")


def _dec_null(item: object) -> bytes:
    if item is not None:
        raise DerError("ocsp-nocheck must be null")
    return b"\x05\x00"


def _enc_octets(value: bytes) -> bytes:
    return _der.read_one(value, _der.OCTET_STRING)


def _dec_octets(item: object) -> bytes:
    return _der.tlv(_der.OCTET_STRING, _as(bytes, item))


_Codec = tuple[Callable[[bytes], Any], Callable[[object], bytes]]
_CODECS: Final[dict[int, _Codec]] = {
    1: (_enc_octets, _dec_octets),
    2: (_enc_key_usage, _dec_key_usage),
    3: (_enc_san, _dec_san),
    4: (_enc_basic_constraints, _dec_basic_constraints),
    5: (_enc_crl_dp, _dec_crl_dp),
    6: (_enc_policies, _dec_policies),
    7: (_enc_aki, _dec_aki),
    8: (_enc_eku, _dec_eku),
    9: (_enc_aia, _dec_aia),
    29: (_enc_crl_dp, _dec_crl_dp),
    36: (_enc_null, _dec_null),
}


# --- the Extensions field -----------------------------------------------------------------------------
def _encode_one(ext: bytes) -> list[Any]:
    (t_oid, oid), *middle, (t_val, value) = _der.read_all(ext)
    critical = bool(middle) and _der.tlv(*middle[0]) == _TRUE
    if t_oid != _der.OID or t_val != _der.OCTET_STRING or len(middle) > 1 or (middle and not critical):
        raise DerError("bad extension")
    number = _BY_OID.get(_der.oid_dotted(oid))
    if number is not None:
        encode, decode = _CODECS[number]
        try:
            item = encode(value)
            if decode(item) == value:
                return [-number if critical else number, item]
        except (DerError, ValueError, TypeError, IndexError):
            pass  # no specific form gives these bytes back: the generic one below does
    return [oid, [value] if critical else value]


def encode_extensions(extensions_der: bytes | None) -> list[Any] | int:
    """The content of the [3] EXPLICIT Extensions (or None) -> the C509 extensions field."""
    if extensions_der is None:
        return []
    flat: list[Any] = []
    for _, ext in _der.read_all(_der.read_one(extensions_der, _der.SEQUENCE)):
        flat += _encode_one(ext)
    if len(flat) == 2 and names.is_int(flat[0]) and abs(flat[0]) == _KEY_USAGE and flat[1] > 0:
        return int(flat[1]) if flat[0] > 0 else -int(flat[1])
    return flat


def _decode_one(kind: object, value: object) -> bytes:
    if isinstance(kind, bytes):
        critical = isinstance(value, list)
        if critical:
            (value,) = _as(list, value)
        body = _der.tlv(_der.OID, _oid_from(kind, {})) + (_TRUE if critical else b"")
        return _der.tlv(_der.SEQUENCE, body + _der.tlv(_der.OCTET_STRING, _as(bytes, value)))
    number = _as(int, kind)
    if abs(number) not in _CODECS:
        raise DerError(f"extension {number} is not supported here")
    body = _der.tlv(_der.OID, _der.oid_content(registry.EXTENSIONS[abs(number)])) + (_TRUE if number < 0 else b"")
    return _der.tlv(_der.SEQUENCE, body + _der.tlv(_der.OCTET_STRING, _CODECS[abs(number)][1](value)))


def decode_extensions(item: object) -> bytes | None:
    """The C509 extensions field -> the DER Extensions SEQUENCE (None when there are none)."""
    if names.is_int(item):
        assert isinstance(item, int)
        if item == 0:
            raise DerError("keyUsage 0 is written as an array")
        item = [-_KEY_USAGE if item < 0 else _KEY_USAGE, abs(item)]
    flat = _as(list, item)
    if len(flat) % 2:
        raise DerError("extensions must be (id, value) pairs")
    if not flat:
        return None
    return _der.tlv(_der.SEQUENCE, b"".join(_decode_one(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)))
