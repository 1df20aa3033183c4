"""A large UpdateInfoList between providers, in parts (issue 13 gap (a), docs/adr/0019). PURE.

SP1's UpdateInfoList is one JWS over the whole CBOR list (seed 003 VII-C), about 1.5 KB a device:
15 MB for 10,000 devices. It stays one signed message; only its *bytes* travel in parts. SP2 asks
SP1's cm for a byte range (``Range: bytes=N-``, RFC 9110 14), each time with a new signed fetch
request that names the offset (:mod:`iotdlm.transfer.peer`); cm relays that one range to km over
NATS and answers ``206`` with ``Content-Range: bytes N-M/TOTAL``. km sends at most
:attr:`PeerLimits.part_bytes` a reply, so no NATS message and no signed km reply outgrows its limit.

SP2 puts the parts together in an :class:`Assembly`: any order, a part received twice is kept
once if it is the same bytes and refused if not, nothing past the announced total, the total
itself bounded by :attr:`PeerLimits.max_update_info_bytes`, and the whole checked at the end
against the transfer id -- the first 16 bytes of the SHA-256 of the UpdateInfoList -- before its
JWS is verified over the bytes received (:func:`iotdlm.transfer.messages.open_update_info`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from iotdlm.errors import BadRequestError, TooLargeError, UntrustedError

MIB = 1024 * 1024


def megabytes(n: int) -> str:
    """``n`` bytes in the operator's words: ``15.2 MB`` (MiB, one decimal), ``2.0 KB`` below 0.1 MB."""
    return f"{n / MIB:.1f} MB" if n >= MIB // 10 else f"{n / 1024:.1f} KB"


@dataclass(frozen=True)
class PeerLimits:
    """Every limit of the provider-to-provider exchange (SP1's km and cm, SP2's client).

    - ``part_bytes``: the most of the UpdateInfoList SP1's km sends in one reply. With base64 twice
      (the relay's JSON, then km's signed reply) a part of 512 KiB is a NATS message of ~0.95 MiB:
      under nats-server's default ``max_payload`` of 1 MiB and km's 4 MiB envelope.
    - ``max_body_bytes``: the largest TransferMessage or confirmation SP1's cm takes (one NATS
      message); SP2 cuts its confirmation into parts below it (``confirm_parts``).
    - ``max_update_info_bytes``: the largest UpdateInfoList SP2 reads (it holds it whole to verify
      the JWS): 96 MiB, the message's own limit (about 46,000 devices at 2.1 KB each).
    - ``confirmation_devices``: the most devices SP2 names in one confirmation part. SP1's km
      revokes their old certificates before it answers, and cm waits for km 10 s (cm's
      ``Limits.km_timeout``): 5,000 devices took longer than that on a loaded 2-core machine,
      1,000 take 1-3 s.
    """

    part_bytes: int = 512 * 1024
    max_body_bytes: int = 512 * 1024
    max_update_info_bytes: int = 96 * MIB
    confirmation_devices: int = 1000

    def __post_init__(self) -> None:
        for name in ("part_bytes", "max_body_bytes", "max_update_info_bytes"):
            if getattr(self, name) < 1024:
                raise ValueError(f"PeerLimits.{name} must be at least 1024 bytes")
        if self.confirmation_devices < 1:
            raise ValueError("PeerLimits.confirmation_devices must be positive")
        # base64 in the relay's JSON and again in km's JWS (4/3 each), plus headers
        if self.part_bytes * 16 // 9 + 64 * 1024 > 4 * MIB:
            raise ValueError("PeerLimits.part_bytes must stay under 2.2 MiB: km's signed reply is capped at 4 MiB")


# --- HTTP byte ranges ---------------------------------------------------------------------------------------
#: the one range form SP2 asks for: ``bytes=N-`` or ``bytes=N-M`` (no lists, no suffix ranges)
_RANGE = re.compile(r"bytes=(\d{1,15})-(\d{0,15})")
_CONTENT_RANGE = re.compile(r"bytes (\d{1,15})-(\d{1,15})/(\d{1,15})")


def parse_range(value: str) -> int:
    """The offset a ``Range`` header asks for (BadRequestError in the operator's words). The end,
    if any, must not come before the start; a part may stop before it (the answer's Content-Range
    says where)."""
    m = _RANGE.fullmatch(value.strip())
    if m is None:
        raise BadRequestError(
            f"Range {value[:60]!r}: ask for one byte range from an offset, e.g. 'bytes=0-'", field="Range"
        )
    start = int(m.group(1))
    if m.group(2) and int(m.group(2)) < start:
        raise BadRequestError(f"Range {value[:60]!r}: the end comes before the start", field="Range")
    return start


def content_range(start: int, length: int, total: int) -> str:
    """The ``Content-Range`` of ``length`` bytes from ``start`` of ``total`` (``length`` > 0)."""
    if not (length > 0 and start >= 0 and start + length <= total):
        raise ValueError(f"no such range: {start}+{length} of {total}")
    return f"bytes {start}-{start + length - 1}/{total}"


@dataclass(frozen=True)
class Part:
    start: int
    end: int  # inclusive, as in Content-Range
    total: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def parse_content_range(value: str) -> Part:
    """A ``Content-Range`` SP1's cm answered (BadRequestError unless ``bytes START-END/TOTAL`` with
    START <= END < TOTAL)."""
    m = _CONTENT_RANGE.fullmatch(value.strip())
    if m is None:
        raise BadRequestError(f"SP1's cm answered Content-Range {value[:60]!r}, not 'bytes START-END/TOTAL'")
    start, end, total = (int(g) for g in m.groups())
    if not start <= end < total:
        raise BadRequestError(f"SP1's cm answered Content-Range {value[:60]!r}: not a range of the total")
    return Part(start, end, total)


# --- SP2 puts the parts together ------------------------------------------------------------------------------
class Assembly:
    """The UpdateInfoList of transfer ``transfer_id`` from its parts (see the module doc). Memory:
    one buffer of the announced size (at most ``max_bytes``) and the list of byte runs held."""

    def __init__(self, transfer_id: str, max_bytes: int) -> None:
        self.transfer_id = transfer_id
        self.max_bytes = max_bytes
        self.total: int | None = None
        self.parts = 0
        self._buf = bytearray()
        #: the byte runs held, [lo, hi), sorted and merged
        self._runs: list[tuple[int, int]] = []

    def next_offset(self) -> int | None:
        """The first byte not held yet (None: all held). A gap is asked for again, never skipped."""
        at = self._runs[0][1] if self._runs and self._runs[0][0] == 0 else 0
        return None if self.total is not None and at >= self.total else at

    def _take_total(self, total: int) -> None:
        if self.total is None:
            if total > self.max_bytes:
                raise TooLargeError(
                    f"the UpdateInfoList of transfer {self.transfer_id} is {megabytes(total)}; this provider "
                    f"reads at most {megabytes(self.max_bytes)} (PeerLimits.max_update_info_bytes): ask SP1 to "
                    "hand the fleet over in several transfers"
                )
            self.total = total
            self._buf = bytearray(total)
        elif total != self.total:
            raise UntrustedError(
                f"SP1's cm announced {total} bytes for the UpdateInfoList, {self.total} before: "
                "not parts of one message"
            )

    def add(self, part: Part, body: bytes) -> None:
        if not 0 <= part.start <= part.end < part.total:
            raise BadRequestError(f"bytes {part.start}-{part.end} are not a range of {part.total} bytes")
        if len(body) != part.length:
            raise BadRequestError(
                f"SP1's cm sent {len(body)} bytes for bytes {part.start}-{part.end} ({part.length} bytes)"
            )
        self._take_total(part.total)
        lo, hi = part.start, part.end + 1
        for a, b in self._runs:  # bytes received twice must be the same bytes
            x, y = max(a, lo), min(b, hi)
            if x < y and self._buf[x:y] != body[x - lo : y - lo]:
                raise UntrustedError(f"SP1's cm sent bytes {x}-{y - 1} twice, and they differ")
        self._buf[lo:hi] = body
        self.parts += 1
        runs = sorted([*self._runs, (lo, hi)])
        merged = [runs[0]]
        for a, b in runs[1:]:
            if a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self._runs = merged

    def result(self) -> bytes:
        """The whole UpdateInfoList, checked against the transfer id (UntrustedError if it is not
        the message the transfer names, BadRequestError if parts are missing)."""
        missing = self.next_offset()
        if self.total is None or missing is not None:
            raise BadRequestError(
                f"the UpdateInfoList of transfer {self.transfer_id} is incomplete: bytes from {missing} on are missing"
            )
        whole = bytes(self._buf)
        if hashlib.sha256(whole).digest()[:16].hex() != self.transfer_id:
            raise UntrustedError(
                f"the UpdateInfoList put together from {self.parts} part(s) is not the one transfer "
                f"{self.transfer_id} names (its SHA-256 differs)"
            )
        return whole


__all__ = [
    "Assembly",
    "Part",
    "PeerLimits",
    "content_range",
    "megabytes",
    "parse_content_range",
    "parse_range",
]
