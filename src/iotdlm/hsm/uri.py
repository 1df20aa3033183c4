"""RFC 7512 PKCS#11 URIs naming a CA key: ``pkcs11:token=iotdlm;object=site-root?pin-source=/etc/pin``.

Parsed strictly (pure: no I/O): the ``pkcs11:`` scheme, path attributes separated by ``;``, query
attributes by ``&``, each at most once, values percent-encoded where RFC 7512 section 2.3 says so.
Taken: ``token``, ``manufacturer``, ``serial``, ``model`` (which token), ``object``, ``id``,
``type`` (which key; ``type`` must be ``private``), ``pin-source`` (a file holding the user PIN),
``pin-value`` (the PIN itself: refused where the URI comes from the command line), ``module-path``
(the PKCS#11 library). Vendor attributes (``x-...``) are refused: we would not know what they ask
for. Every refusal is a :class:`~iotdlm.errors.BadRequestError` naming the attribute.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Final

from iotdlm.errors import BadRequestError

__all__ = ["Pkcs11Uri", "parse_pkcs11_uri"]

MAX_URI_CHARS: Final = 4096
#: the environment variable the PIN may come from (read by :func:`iotdlm.hsm.token.read_pin`)
PIN_ENV_NAME: Final = "IOTDLM_HSM_PIN"
_SCHEME: Final = "pkcs11:"
_PATH_ATTRS: Final = frozenset({"token", "manufacturer", "serial", "model", "object", "id", "type"})
_QUERY_ATTRS: Final = frozenset({"pin-source", "pin-value", "module-path"})
#: the attributes of RFC 7512 we understand but do not take (the message says why)
_NOT_TAKEN: Final = {
    "library-manufacturer": "name the library with module-path",
    "library-description": "name the library with module-path",
    "library-version": "name the library with module-path",
    "slot-description": "name the token with token=",
    "slot-manufacturer": "name the token with token=",
    "slot-id": "name the token with token= (slot numbers change between reboots)",
    "module-name": "give the library's full path with module-path=",
}
_PCT: Final = r"%[0-9A-Fa-f]{2}"
#: RFC 7512 2.3: pk11-v-path-res / pk11-v-query-res plus unreserved and pct-encoded
_PATH_VALUE: Final = re.compile(rf"(?:[A-Za-z0-9\-._~:\[\]@!$'()*+,=&]|{_PCT})*")
_QUERY_VALUE: Final = re.compile(rf"(?:[A-Za-z0-9\-._~:\[\]@!$'()*+,=/?|;]|{_PCT})*")
_KEY_TYPES: Final = frozenset({"private"})


@dataclass(frozen=True)
class Pkcs11Uri:
    """The parts of a PKCS#11 URI iotdlm uses; None where the URI leaves it open."""

    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    object: str | None = None
    id: bytes | None = None
    module_path: str | None = None
    pin_source: str | None = None
    pin_value: str | None = None

    def to_string(self) -> str:
        """The URI again (without pin-value: a PIN is never written back out)."""
        path = [
            f"{name}={urllib.parse.quote(value, safe='')}"
            for name, value in (
                ("token", self.token),
                ("manufacturer", self.manufacturer),
                ("serial", self.serial),
                ("model", self.model),
                ("object", self.object),
            )
            if value is not None
        ]
        if self.id is not None:
            path.append("id=" + "".join(f"%{b:02X}" for b in self.id))
        query = [
            f"{name}={urllib.parse.quote(value, safe='/')}"
            for name, value in (("module-path", self.module_path), ("pin-source", self.pin_source))
            if value is not None
        ]
        return _SCHEME + ";".join(path) + ("?" + "&".join(query) if query else "")


def _attributes(part: str, sep: str, allowed: frozenset[str], value_re: re.Pattern[str]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for item in part.split(sep) if part else []:
        name, eq, raw = item.partition("=")
        if not eq or not name:
            raise BadRequestError(f"PKCS#11 URI: {item!r} is not name=value")
        if name in _NOT_TAKEN:
            raise BadRequestError(f"PKCS#11 URI: {name} is not supported here; {_NOT_TAKEN[name]}")
        if name not in allowed:
            where = "path (before ?)" if sep == ";" else "query (after ?)"
            known = ", ".join(sorted(allowed))
            raise BadRequestError(f"PKCS#11 URI: unknown attribute {name!r} in the {where}; known there: {known}")
        if name in out:
            raise BadRequestError(f"PKCS#11 URI: {name} appears twice")
        if not value_re.fullmatch(raw):
            raise BadRequestError(
                f"PKCS#11 URI: the value of {name} holds a character that must be percent-encoded (RFC 7512 2.3)"
            )
        out[name] = urllib.parse.unquote_to_bytes(raw)
    return out


def _text(attrs: dict[str, bytes], name: str) -> str | None:
    raw = attrs.get(name)
    if raw is None:
        return None
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequestError(f"PKCS#11 URI: {name} is not UTF-8 text after percent-decoding") from exc
    if not value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise BadRequestError(f"PKCS#11 URI: {name} is empty or holds control characters")
    return value


def parse_pkcs11_uri(text: str, *, allow_pin_value: bool = False) -> Pkcs11Uri:
    """Parse ``text`` (see the module docstring); raise BadRequestError naming what is wrong.

    ``pin-value=`` is refused unless ``allow_pin_value`` (a URI typed on the command line shows its
    PIN to every user of the machine, in ``ps`` and the shell's history)."""
    if not isinstance(text, str):
        raise BadRequestError("PKCS#11 URI must be text")
    if len(text) > MAX_URI_CHARS:
        raise BadRequestError(f"PKCS#11 URI of {len(text)} characters is longer than {MAX_URI_CHARS}")
    if not text[: len(_SCHEME)].lower() == _SCHEME:
        raise BadRequestError(f"not a PKCS#11 URI: it must start with {_SCHEME} (RFC 7512), e.g. pkcs11:token=...")
    path, _, query = text[len(_SCHEME) :].partition("?")
    p = _attributes(path, ";", _PATH_ATTRS, _PATH_VALUE)
    q = _attributes(query, "&", _QUERY_ATTRS, _QUERY_VALUE)
    key_type = _text(p, "type")
    if key_type is not None and key_type not in _KEY_TYPES:
        raise BadRequestError(f"PKCS#11 URI: type={key_type} does not name a CA key; use type=private or leave it out")
    key_id = p.get("id")
    if key_id is not None and not key_id:
        raise BadRequestError("PKCS#11 URI: id is empty")
    uri = Pkcs11Uri(
        token=_text(p, "token"),
        manufacturer=_text(p, "manufacturer"),
        serial=_text(p, "serial"),
        model=_text(p, "model"),
        object=_text(p, "object"),
        id=key_id,
        module_path=_text(q, "module-path"),
        pin_source=_text(q, "pin-source"),
        pin_value=_text(q, "pin-value"),
    )
    if uri.token is None and uri.serial is None:
        raise BadRequestError("PKCS#11 URI: name the token with token=LABEL (or serial=)")
    if uri.pin_value is not None and not allow_pin_value:
        raise BadRequestError(
            f"PKCS#11 URI: no pin-value= here: a PIN on the command line is visible to every user of this machine; "
            f"put it in a file (mode 0600) and add ?pin-source=/path/to/file, or set ${PIN_ENV_NAME}"
        )
    if uri.pin_source is not None and uri.pin_value is not None:
        raise BadRequestError("PKCS#11 URI: give pin-source or pin-value, not both")
    return uri
