"""The download report sm sends the vendor's repository after a verified download (paper 4.4.5).

One schema for both ends: sm builds a :class:`ReportBody`, seals it in a signed request envelope
(:mod:`iotdlm.wire.envelope`, op :data:`OP_REPORT`, aud :data:`REPORT_AUDIENCE`) and POSTs it to
``{repository}/reports``; the repository checks the envelope, then the body with
:func:`decode_report_body`.

``verified_at`` is an RFC 3339 time with a zone (``"2026-11-21T12:00:00Z"``, what sm sends) or unix
seconds.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Final

import msgspec

from iotdlm.errors import BadRequestError
from iotdlm.pki.names import check_id

#: operation and audience of the signed download report (POST {repository}/reports)
OP_REPORT: Final = "repository.report"
REPORT_AUDIENCE: Final = "repository"
#: largest report envelope the repository reads
MAX_REPORT_BYTES: Final = 64 * 1024

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class ReportBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of the signed report of a verified download: which image sm verified, and when."""

    dtype: str
    release_counter: int
    target_path: str  # "<dtype>/<name>"
    sha256: str
    length: int
    verified_at: dt.datetime | float


_decoder = msgspec.json.Decoder(ReportBody)


def decode_report_body(raw: bytes) -> ReportBody:
    """Parse and check a report body; anything malformed is a BadRequestError naming the field."""
    try:
        body = _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadRequestError(f"report body is not valid: {exc}") from exc
    check_id(body.dtype, "dtype")
    if body.release_counter < 1:
        raise BadRequestError("release_counter must be >= 1", field="release_counter")
    parent, _, name = body.target_path.partition("/")
    if parent != body.dtype:
        raise BadRequestError(f"target_path must be {body.dtype}/<name>", field="target_path")
    check_id(name, "target name")
    if not _SHA256_RE.match(body.sha256):
        raise BadRequestError("sha256 must be 64 lowercase hex digits", field="sha256")
    if body.length < 0:
        raise BadRequestError("length must be >= 0", field="length")
    if isinstance(body.verified_at, dt.datetime) and body.verified_at.tzinfo is None:
        raise BadRequestError("verified_at must carry a time zone (RFC 3339)", field="verified_at")
    return body


def verified_time(body: ReportBody) -> dt.datetime:
    """``verified_at`` as an aware UTC datetime (unix seconds converted)."""
    if isinstance(body.verified_at, dt.datetime):
        return body.verified_at.astimezone(dt.UTC)
    try:
        return dt.datetime.fromtimestamp(body.verified_at, dt.UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise BadRequestError("verified_at is not a valid time", field="verified_at") from exc


__all__ = ["MAX_REPORT_BYTES", "OP_REPORT", "REPORT_AUDIENCE", "ReportBody", "decode_report_body", "verified_time"]
