"""Say what is wrong with bytes that should have been DER, in the requester's words.

Parsers (cryptography, pyasn1) say *that* they failed, in their own debug text (``ParseError { kind:
ShortData { needed: 92 } }``). :func:`describe_der_problem` looks at the bytes themselves and says *what*
is wrong: empty, PEM where DER was expected, base64, text, truncated (and by how much), BER instead
of DER, trailing bytes, or well-formed DER that is not the expected structure. Callers use it on the
error path only, after their library refused the bytes, and put its phrase in their RejectedError.

This module is pure: no I/O.
"""

from __future__ import annotations

import binascii
import re
from typing import Final

__all__ = ["describe_der_problem"]

_MAX_DEPTH: Final = 32
_MAX_ELEMENTS: Final = 20_000
_B64: Final = re.compile(rb"[A-Za-z0-9+/]+=*")
_B64URL: Final = re.compile(rb"[A-Za-z0-9_\-]+=*")
_PEM_BEGIN: Final = re.compile(rb"-----BEGIN ([A-Z0-9 #]{1,64})-----")
_TAG_NAMES: Final = {
    0x01: "a BOOLEAN",
    0x02: "an INTEGER",
    0x03: "a BIT STRING",
    0x04: "an OCTET STRING",
    0x05: "a NULL",
    0x06: "an OBJECT IDENTIFIER",
    0x0C: "a UTF8String",
    0x13: "a PrintableString",
    0x16: "an IA5String",
    0x17: "a UTCTime",
    0x18: "a GeneralizedTime",
    0x30: "a SEQUENCE",
    0x31: "a SET",
}


def _a(what: str) -> str:
    """``what`` with its indefinite article, as it is read aloud: "an OCSP request", "an X.509
    certificate", "a PKCS#10 request", "a CMP PKIMessage"."""
    first = what.split(" ", 1)[0]
    acronym = len(first) > 1 and first[:2].isupper()
    vowel_sound = first[:1].lower() in "aeiou" or (acronym and first[0] in "FHLMNRSX")
    return f"{'an' if vowel_sound else 'a'} {what}"


class _Problem(Exception):
    """Internal: the first thing found wrong, already worded."""


def _tag_name(tag: int) -> str:
    if tag in _TAG_NAMES:
        return _TAG_NAMES[tag]
    if tag & 0xC0 == 0x80:
        return f"a context-specific [{tag & 0x1F}] element (tag 0x{tag:02x})"
    return f"tag 0x{tag:02x}"


def _header(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the TLV at ``pos``; raise _Problem naming what is wrong.

    The content end may lie past ``end``: the caller words that overrun (truncation) itself.
    """
    if end - pos < 2:
        raise _Problem("truncated: the DER header is cut short")
    tag = data[pos]
    pos += 1
    if tag & 0x1F == 0x1F:  # high tag number form: skip its base-128 bytes
        while True:
            if pos >= end:
                raise _Problem("truncated: the DER header is cut short")
            byte = data[pos]
            pos += 1
            if not byte & 0x80:
                break
        if pos >= end:
            raise _Problem("truncated: the DER header is cut short")
    first = data[pos]
    pos += 1
    if first < 0x80:
        return tag, pos, pos + first
    if first == 0x80:
        raise _Problem("not DER: indefinite length (BER); re-encode it as DER")
    n = first & 0x7F
    if n > 8:
        raise _Problem(f"not DER: a length field of {n} bytes")
    if end - pos < n:
        raise _Problem("truncated: the DER header is cut short")
    length = int.from_bytes(data[pos : pos + n], "big")
    if data[pos] == 0 or length < 0x80:
        raise _Problem("not DER: a length is not in its shortest form")
    pos += n
    return tag, pos, pos + length


def _walk(data: bytes, start: int, end: int, depth: int, budget: list[int]) -> None:
    """Check that the constructed content ``data[start:end]`` is a run of TLVs that exactly fills it."""
    pos = start
    while pos < end:
        budget[0] -= 1
        if budget[0] < 0 or depth > _MAX_DEPTH:
            return  # deep or huge: stop looking, the structure is at least plausible so far
        tag, c_start, c_end = _header(data, pos, end)
        if c_end > end:
            raise _Problem(
                f"not DER: the element at byte {pos} says {c_end - c_start} bytes but only "
                f"{max(0, end - c_start)} remain in the element that holds it"
            )
        if tag & 0x20:  # constructed
            _walk(data, c_start, c_end, depth + 1, budget)
        pos = c_end


def _describe_der(data: bytes, what: str) -> str:
    try:
        tag, c_start, c_end = _header(data, 0, len(data))
        if c_end > len(data):
            return f"truncated: the DER says {c_end} bytes, {len(data)} given"
        if c_end < len(data):
            return f"trailing bytes after the DER: {len(data) - c_end} bytes after the {c_end} the DER says"
        if tag != 0x30:
            return f"not {_a(what)}: the DER holds {_tag_name(tag)}, {_a(what)} is a SEQUENCE"
        _walk(data, c_start, c_end, 1, [_MAX_ELEMENTS])
    except _Problem as problem:
        return str(problem)
    return f"not {_a(what)}: well-formed DER, but not the structure or values of {_a(what)}"


def _looks_like_text(data: bytes) -> bool:
    return all(32 <= b < 127 or b in (9, 10, 13) for b in data)


def _looks_like_base64(data: bytes) -> bool:
    """Base64 (or base64url) text: only its alphabet, split into lines at most, of a plausible length."""
    lines = data.strip().splitlines()
    joined = b"".join(line.strip(b"\r") for line in lines)
    if len(joined) < 8 or not (_B64.fullmatch(joined) or _B64URL.fullmatch(joined)):
        return False
    return b"=" not in joined.rstrip(b"=") and (len(joined) % 4 == 0 or b"=" not in joined)


def _pem(data: bytes, what: str, pem_labels: tuple[str, ...]) -> str:
    text = data.strip()
    begin = _PEM_BEGIN.match(text)
    label = begin.group(1).decode("ascii") if begin else "?"
    if not pem_labels:
        return f"not DER: looks like PEM (-----BEGIN {label}-----); give the DER form of the {what}"
    if label not in pem_labels:
        return f"not {_a(what)}: PEM of {_a(label)} (expected -----BEGIN {pem_labels[0]}-----)"
    assert begin is not None
    end_marker = f"-----END {label}-----".encode("ascii")
    end_at = text.find(end_marker, begin.end())
    if end_at < 0:
        return f"truncated PEM: no -----END {label}----- line"
    body = text[begin.end() : end_at]
    lines = [line for line in body.splitlines() if line.strip() and b":" not in line]  # skip RFC 1421 headers
    try:
        inner = binascii.a2b_base64(b"".join(line.strip() for line in lines), strict_mode=True)
    except (binascii.Error, ValueError):
        return f"PEM {label} whose base64 body is damaged"
    if not inner:
        return f"PEM {label} with an empty body"
    return f"PEM {label}: {_describe_der(inner, what)}"


def describe_der_problem(data: bytes, what: str, *, pem_labels: tuple[str, ...] = ()) -> str:
    """A short phrase saying why ``data`` is not the DER of a ``what`` (e.g. "PKCS#10 request").

    ``pem_labels``: the PEM labels the caller accepts too (e.g. ``("CERTIFICATE REQUEST",
    "NEW CERTIFICATE REQUEST")``); PEM with one of them is unwrapped and its DER described. Empty: PEM is
    itself the problem. Meant for the error path, after a parser refused ``data``: when the bytes look
    fine on the outside, the phrase says so ("well-formed DER, but not ... a <what>").
    """
    data = bytes(data)
    if not data:
        return "empty: no bytes given"
    if data.lstrip()[:11] == b"-----BEGIN ":
        return _pem(data, what, pem_labels)
    if not _looks_like_text(data):  # DER is binary: a real one is never all printable text
        return _describe_der(data, what)
    if _looks_like_base64(data):
        hint = "" if not pem_labels else f", or wrap it in -----BEGIN {pem_labels[0]}----- lines"
        return f"not DER: looks like base64; decode it first (base64 -d){hint}"
    return f"not DER: looks like text, not the binary DER of {_a(what)}"
