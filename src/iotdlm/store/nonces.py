"""The replay nonce repository: each ``(sender, nonce)`` of a signed request is accepted once.

Nonces come straight from requests, so a nonce the column cannot hold raises
:class:`~iotdlm.errors.BadRequestError`, not ``ValueError``; a reused one raises
:class:`~iotdlm.errors.ReplayError`. :func:`insert_nonce` consumes one inside another write
(km's issuance: a replayed request stores nothing).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import Connection, delete
from sqlalchemy import exc as sa_exc

from iotdlm import errors
from iotdlm.store import records as r
from iotdlm.store.driver import DriverConnection
from iotdlm.store.engine import Database
from iotdlm.store.queries import quote
from iotdlm.store.tables import nonces


def check_nonce(sender: str, nonce: str, expires_at: dt.datetime) -> None:
    """Refuse a nonce no row can hold as bad input (:class:`~iotdlm.errors.BadRequestError`)."""
    for name, value, max_len in (("sender", sender, r.SENDER_LEN), ("nonce", nonce, r.NONCE_LEN)):
        if not r.findable_text(value, max_len):
            # Nonces come straight from requests: refuse them as bad input, not as a bug.
            raise errors.BadRequestError(f"{name} must be at most {max_len} characters without NUL", field=name)
    r.check_aware("expires_at", expires_at)


#: built once: constructing the statement per request cost more than executing it (issue 15)
_INSERT = nonces.insert()


def insert_nonce(conn: Connection | DriverConnection, sender: str, nonce: str, expires_at: dt.datetime) -> None:
    """Inside a write transaction; a reused nonce raises ReplayError (and the transaction rolls back)."""
    insert_nonces(conn, [(sender, nonce, expires_at)])


def insert_nonces(conn: Connection | DriverConnection, uses: Sequence[tuple[str, str, dt.datetime]]) -> None:
    """``(sender, nonce, expires_at)`` rows inside a write transaction, in one statement; any of
    them reused raises ReplayError, and the caller's transaction must then roll back (no
    savepoint: the error leaves the transaction, as a failed statement does on PostgreSQL)."""
    if not uses:
        return
    try:
        conn.execute(_INSERT, [{"sender": a, "nonce": n, "expires_at": e} for a, n, e in uses])
    except sa_exc.IntegrityError as exc:
        if len(uses) == 1:
            ((sender, nonce, _e),) = uses
            raise errors.ReplayError(
                f"nonce {quote(nonce)} from {quote(sender)} was already used", field="nonce"
            ) from exc
        raise errors.ReplayError(f"one of {len(uses)} nonces was already used", field="nonce") from exc


class NonceRepository(Database):
    """Replay nonces of signed requests."""

    def consume_nonce(self, sender: str, nonce: str, *, expires_at: dt.datetime) -> None:
        """Record that ``sender`` used ``nonce``; raise :class:`~iotdlm.errors.ReplayError` if it had.

        Race-free across threads and processes: the primary key ``(sender, nonce)`` decides.
        The row is kept until :meth:`purge_nonces` runs after ``expires_at``.
        """
        check_nonce(sender, nonce, expires_at)
        with self.transaction("recording a nonce", write=True) as conn:
            insert_nonce(conn, sender, nonce, expires_at)

    def purge_nonces(self, now: dt.datetime) -> int:
        """Forget nonces whose ``expires_at`` is at or before ``now``; return how many."""
        r.check_aware("now", now)
        with self.transaction("purging nonces", write=True) as conn:
            return int(conn.execute(delete(nonces).where(nonces.c.expires_at <= now)).rowcount)
