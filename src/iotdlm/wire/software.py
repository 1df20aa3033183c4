"""sm's messages: its NATS API for pm (list, load, notify), its events, and ``info.json``.

The formats of the software itself (the metadata bundle, ``sig_sm``, ``meta.enc``) and Algorithm 1
are in :mod:`iotdlm.software`; the download report sm sends the repository is in
:mod:`iotdlm.wire.report`.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import TypeVar

import msgspec

from iotdlm.errors import BadRequestError
from iotdlm.wire import codec
from iotdlm.wire.codec import encode as encode

#: release counters are JSON integers in the repository's metadata: 0 .. 2**63 - 1
MAX_RELEASE_COUNTER = 2**63 - 1

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_dtype(dtype: str, *, field: str = "dtype") -> str:
    if not isinstance(dtype, str) or not _ID_RE.match(dtype):
        raise BadRequestError(
            f"dtype {dtype!r} is not valid: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            field=field,
        )
    return dtype


def check_release_counter(value: object, *, field: str = "release_counter") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_RELEASE_COUNTER:
        raise BadRequestError(f"release counter {value!r} is not an integer in 0..2**63-1", field=field)
    return value


# --- messages (sm's NATS API, the local repository's info.json) --------------------------------


class StoredSoftware(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``info.json`` of one stored version (unencrypted: only what pm needs to list)."""

    dtype: str
    release_counter: int
    target_path: str
    length: int
    sha256: str
    stored_at: str  # ISO 8601 UTC


class ListRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dtype: str


class ListResponse(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    versions: list[StoredSoftware]  # ascending release counter


class LoadRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dtype: str
    release_counter: int | None = None  # default: the latest stored


class LoadResponse(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dtype: str
    release_counter: int
    image_path: str  # absolute; pm and sm share the local repository folder
    meta_enc: bytes
    sig_sm: bytes


class HeldRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``sm.software.held``: the releases sm holds (of ``dtype``, or of every dtype)."""

    dtype: str | None = None


class HeldRelease(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One release sm holds, verified again when asked (Algorithm 1, as pm will before flashing)."""

    dtype: str
    release_counter: int
    target_path: str
    length: int
    sha256: str
    #: when sm verified it against the repository's metadata and stored it (ISO 8601 UTC)
    stored_at: str
    #: "verified": sig_sm, meta_repo and the image verify now; "failed": ``problem`` says why
    sig_sm: str
    problem: str | None = None


class HeldResponse(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    releases: list[HeldRelease]  # by dtype, then ascending release counter
    #: when sm last checked the repository, per dtype (ISO 8601 UTC)
    checked_at: dict[str, str] = {}


class NotifyMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The repository announced a new release for ``dtype`` (cm relays its webhook)."""

    dtype: str


class SmEvent(msgspec.Struct, frozen=True, omit_defaults=True):
    """Published by sm on ``iotdlm.v1.events.sm.<kind>`` (stored, checked, refused, failed)."""

    kind: str
    dtype: str
    release_counter: int | None = None
    code: str | None = None
    message: str | None = None
    field: str | None = None


_M = TypeVar("_M")


def decode(data: bytes, cls: type[_M], *, what: str = "request") -> _M:
    """Decode a message; schema or JSON problems become BadRequestError; dtype and counters are checked."""
    out = codec.decode(data, cls, what=what)
    dtype = getattr(out, "dtype", None)
    if dtype is not None:
        check_dtype(dtype)
    counter = getattr(out, "release_counter", None)
    if counter is not None:
        check_release_counter(counter)
    return out


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


__all__ = [
    "MAX_RELEASE_COUNTER",
    "HeldRelease",
    "HeldRequest",
    "HeldResponse",
    "ListRequest",
    "ListResponse",
    "LoadRequest",
    "LoadResponse",
    "NotifyMessage",
    "SmEvent",
    "StoredSoftware",
    "check_dtype",
    "check_release_counter",
    "decode",
    "encode",
    "iso",
]
