"""cm's cache of km's pre-signed OCSP answers (pure: no I/O; the time is passed in).

RFC 5019 answers (no nonce) are the same bytes for every asker until their nextUpdate, and km
already pre-signs and caches them; cm keeps them too, so that a repeated request is answered
without the NATS round trip to km. What keeps it correct:

- only a successful answer with one SingleResponse, no nonce, status good or revoked, is kept
  (never ``unknown``: the certificate may be issued a moment later); a revoked answer until its
  nextUpdate, a good one until its nextUpdate or its thisUpdate + ``good_for``, whichever is first
  (``good_for`` is the deployment's ``superseded_grace_seconds``: a certificate superseded at
  re-enrollment turns revoked that long after, with no event; km's own cache keeps a good answer
  no longer either);
- a revocation is seen at once: km publishes ``iotdlm.v1.events.km.revoked`` for every certificate
  it revokes, and :meth:`OcspCache.revoked` drops every kept answer for that serial; from then on
  an answer for that serial is kept only if it says revoked (a km worker that has not yet heard of
  the revocation may still hand out its older good answer: cm relays it once, it never keeps it);
- the operation mode is checked before the cache is read (cm's handler does that first).

The key is the request's DER: two askers who spell the same question the same way share an answer.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import OrderedDict
from dataclasses import dataclass

from cryptography.x509 import ocsp

from iotdlm.cm.http_cache import reusable_ocsp_answer

#: answers kept at most (the oldest used is dropped first)
DEFAULT_SIZE = 100_000
#: serials whose revocation cm heard of, remembered at most (the oldest heard is forgotten first)
REVOKED_MEMORY = 100_000
#: a serial in an event: hex, at most 20 octets (RFC 5280 4.1.2.2)
_HEX = re.compile(r"[0-9a-fA-F]{1,40}")


@dataclass(frozen=True)
class _Entry:
    der: bytes
    serial: int
    until: dt.datetime


def cacheable(der: bytes) -> tuple[int, bool, dt.datetime, dt.datetime] | None:
    """(serial, revoked?, thisUpdate, nextUpdate) of an answer cm may keep, None for one it must not."""
    resp = reusable_ocsp_answer(der)
    if resp is None:
        return None
    try:
        status = resp.certificate_status  # raises ValueError when it holds several answers
        next_update = resp.next_update_utc
        if next_update is None or status is ocsp.OCSPCertStatus.UNKNOWN:
            return None
        revoked = status is ocsp.OCSPCertStatus.REVOKED
        return resp.serial_number, revoked, resp.this_update_utc, next_update
    except ValueError:
        return None


def revoked_serial(event: bytes) -> int | None:
    """The serial of km's revocation event (``{"issuer": ..., "serial": "<hex>"}``), None when it
    does not read (the caller then drops everything: never keep what may be stale)."""
    try:
        serial = json.loads(event)["serial"]
        if not isinstance(serial, str) or _HEX.fullmatch(serial) is None:
            return None
        return int(serial, 16)
    except (ValueError, TypeError, KeyError, IndexError):
        return None


class OcspCache:
    """Answers by request DER until their nextUpdate, dropped at once when their serial is revoked."""

    def __init__(self, *, good_for: dt.timedelta, size: int = DEFAULT_SIZE) -> None:
        if size < 1:
            raise ValueError("the OCSP cache holds at least one answer")
        if good_for < dt.timedelta(0):
            raise ValueError("good_for must not be negative")
        self.size = size
        self.good_for = good_for
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._by_serial: dict[int, set[bytes]] = {}
        self._revoked: OrderedDict[int, None] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, request_der: bytes, now: dt.datetime) -> bytes | None:
        entry = self._entries.get(request_der)
        if entry is None:
            self.misses += 1
            return None
        if entry.until <= now:
            self._drop(request_der)
            self.misses += 1
            return None
        self._entries.move_to_end(request_der)
        self.hits += 1
        return entry.der

    def put(self, request_der: bytes, answer_der: bytes, now: dt.datetime) -> bool:
        """Keep ``answer_der`` for ``request_der`` if it may be kept (see the module doc)."""
        facts = cacheable(answer_der)
        if facts is None:
            return False
        serial, revoked, this_update, next_update = facts
        until = next_update if revoked else min(next_update, this_update + self.good_for)
        if until <= now or (serial in self._revoked and not revoked):
            return False
        self._drop(request_der)
        self._entries[request_der] = _Entry(answer_der, serial, until)
        self._by_serial.setdefault(serial, set()).add(request_der)
        while len(self._entries) > self.size:
            self._drop(next(iter(self._entries)))
        return True

    def revoked(self, serial: int) -> int:
        """km revoked ``serial`` (under some CA): drop its answers; returns how many were dropped."""
        self._revoked[serial] = None
        self._revoked.move_to_end(serial)
        while len(self._revoked) > REVOKED_MEMORY:
            self._revoked.popitem(last=False)
        keys = self._by_serial.pop(serial, set())
        for key in keys:
            self._entries.pop(key, None)
        return len(keys)

    def clear(self) -> None:
        self._entries.clear()
        self._by_serial.clear()

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        keys = self._by_serial.get(entry.serial)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_serial[entry.serial]


__all__ = ["DEFAULT_SIZE", "OcspCache", "cacheable", "revoked_serial"]
