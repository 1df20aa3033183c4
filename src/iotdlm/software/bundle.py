"""The metadata bundle ``meta_repo`` (what pm verifies with ``pk_repo``), in its one canonical encoding.

Canonical JSON, UTF-8, no whitespace, keys in this order (alphabetical)::

    {"dtype": "<D>",
     "format": "iotdlm.sm.meta/1",
     "role": "<base64 of the dtype-D delegated targets metadata, bytes as served by the repository>",
     "roots": ["<base64 of N.root.json>", ...],   # root history, ascending and contiguous, the
                                                  # last one is the root sm trusted at download
     "target_path": "<D>/<name>",
     "targets": "<base64 of the top-level targets metadata, bytes as served>"}

Base64 is standard with padding (msgspec's encoding of ``bytes``). :func:`decode_bundle` accepts
only the exact canonical encoding (it re-encodes and compares), so the bundle has one byte string
and ``meta || sw`` cannot be re-split into another valid (meta, sw) pair.
"""

from __future__ import annotations

import msgspec

from iotdlm.errors import BadRequestError, TooLargeError, UnsupportedError
from iotdlm.wire.software import check_dtype

BUNDLE_FORMAT = "iotdlm.sm.meta/1"
#: largest bundle accepted (roots + top-level targets + one dtype role)
MAX_BUNDLE_BYTES = 32 * 1024 * 1024
MAX_ROOTS = 1024


class MetaBundle(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``meta_repo`` as stored: fields in alphabetical order, so msgspec's encoding is canonical."""

    dtype: str
    format: str
    role: bytes
    roots: list[bytes]
    target_path: str
    targets: bytes


_encoder = msgspec.json.Encoder()
_bundle_decoder = msgspec.json.Decoder(MetaBundle)


def encode_bundle(*, dtype: str, target_path: str, roots: list[bytes], targets: bytes, role: bytes) -> bytes:
    check_dtype(dtype)
    if not roots:
        raise ValueError("a bundle needs at least one root")
    return _encoder.encode(
        MetaBundle(dtype=dtype, format=BUNDLE_FORMAT, role=role, roots=roots, target_path=target_path, targets=targets)
    )


def decode_bundle(data: bytes) -> MetaBundle:
    """Parse a bundle; anything but the exact canonical encoding of a valid bundle is refused."""
    f = "meta_repo"
    if len(data) > MAX_BUNDLE_BYTES:
        raise TooLargeError(f"metadata bundle of {len(data)} bytes exceeds {MAX_BUNDLE_BYTES}", field=f)
    try:
        bundle = _bundle_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequestError(f"metadata bundle is not valid: {exc}", field=f) from exc
    if bundle.format != BUNDLE_FORMAT:
        raise UnsupportedError(f"metadata bundle format {bundle.format!r} is not {BUNDLE_FORMAT!r}", field=f)
    check_dtype(bundle.dtype, field=f)
    if not bundle.roots or len(bundle.roots) > MAX_ROOTS:
        raise BadRequestError(f"metadata bundle must hold 1 to {MAX_ROOTS} roots", field=f)
    if _encoder.encode(bundle) != data:
        raise BadRequestError("metadata bundle is not in canonical form", field=f)
    return bundle


__all__ = ["BUNDLE_FORMAT", "MAX_BUNDLE_BYTES", "MAX_ROOTS", "MetaBundle", "decode_bundle", "encode_bundle"]
