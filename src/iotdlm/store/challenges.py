"""SP2's outstanding attestation challenges (migration 0007), a mixin of :class:`~iotdlm.store.Store`.

The verifier at the raURI (:mod:`iotdlm.km.transfer_device_handlers`) issues a nonce to a device
and judges the evidence that answers it; keeping the nonces here instead of in one km worker's
memory lets any worker judge the evidence, across a km restart too. The rules:

- **bounded per device**: issuing one keeps at most ``keep`` outstanding for the device (the
  newest; older ones are dropped in the same transaction), and drops every expired challenge;
- **single use**: :meth:`ChallengeRepository.take_challenge` deletes the row it returns, in one
  write transaction (two workers taking the same nonce: one gets it, the other None);
- **expiry**: the row keeps ``expires_at``; the verifier refuses a late answer
  (:func:`iotdlm.transfer.attestation.verify`), and :meth:`purge_challenges` forgets expired rows.

Nonces come from requests (the evidence): a device id or nonce no row can hold finds nothing.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import delete, select

from iotdlm.store import records as r
from iotdlm.store.engine import Database
from iotdlm.store.tables import attestation_challenges as ch

#: nonce sizes the verifier issues (bytes)
MIN_NONCE, MAX_NONCE = 16, 64


@dataclass(frozen=True, slots=True)
class ChallengeRecord:
    device_id: str
    nonce: bytes
    issued_at: dt.datetime
    expires_at: dt.datetime

    def __post_init__(self) -> None:
        r.check_text("device_id", self.device_id, r.DEVICE_ID_LEN)
        if not self.device_id:
            raise ValueError("a challenge is issued to a device (device_id is empty)")
        if not MIN_NONCE <= len(self.nonce) <= MAX_NONCE:
            raise ValueError(f"a challenge nonce is {MIN_NONCE} to {MAX_NONCE} bytes")
        r.check_aware("issued_at", self.issued_at)
        r.check_aware("expires_at", self.expires_at)
        if self.expires_at <= self.issued_at:
            raise ValueError("a challenge expires after it is issued")


class ChallengeRepository(Database):
    """Outstanding attestation challenges, one row per (device, nonce)."""

    def put_challenge(self, rec: ChallengeRecord, *, keep: int) -> None:
        """Issue ``rec``: the device keeps its ``keep`` newest challenges (this one included);
        expired challenges of every device are dropped."""
        if keep < 1:
            raise ValueError("keep at least the challenge just issued")
        with self.transaction("issuing an attestation challenge", write=True) as conn:
            conn.execute(delete(ch).where(ch.c.expires_at <= rec.issued_at))
            conn.execute(
                ch.insert().values(device_id=rec.device_id, nonce=rec.nonce.hex(), issued_at=rec.issued_at,
                                   expires_at=rec.expires_at)
            )  # fmt: skip
            newest = (
                select(ch.c.nonce)
                .where(ch.c.device_id == rec.device_id)
                .order_by(ch.c.issued_at.desc(), ch.c.nonce.desc())
                .limit(keep)
            )
            kept = [row.nonce for row in conn.execute(newest)]
            conn.execute(delete(ch).where(ch.c.device_id == rec.device_id, ch.c.nonce.not_in(kept)))

    def take_challenge(self, device_id: str, nonce: bytes) -> ChallengeRecord | None:
        """The outstanding challenge of ``device_id`` with ``nonce``, deleted as it is returned
        (single use; None when there is none, or another worker took it first). Expired ones are
        returned too: the verifier says why it refuses them."""
        if not r.findable_text(device_id, r.DEVICE_ID_LEN) or not MIN_NONCE <= len(nonce) <= MAX_NONCE:
            return None
        where = (ch.c.device_id == device_id, ch.c.nonce == nonce.hex())
        with self.transaction("taking an attestation challenge", write=True) as conn:
            row = conn.execute(select(ch.c.issued_at, ch.c.expires_at).where(*where)).first()
            if row is None or conn.execute(delete(ch).where(*where)).rowcount != 1:
                return None
        return ChallengeRecord(device_id, nonce, row.issued_at, row.expires_at)

    def count_challenges(self, device_id: str) -> int:
        """How many challenges ``device_id`` has outstanding (expired ones included until purged)."""
        if not r.findable_text(device_id, r.DEVICE_ID_LEN):
            return 0
        with self.transaction("counting attestation challenges", write=False) as conn:
            return len(conn.execute(select(ch.c.nonce).where(ch.c.device_id == device_id)).all())

    def purge_challenges(self, now: dt.datetime) -> int:
        """Forget challenges that expired at or before ``now``; return how many."""
        r.check_aware("now", now)
        with self.transaction("purging attestation challenges", write=True) as conn:
            return int(conn.execute(delete(ch).where(ch.c.expires_at <= now)).rowcount)


__all__ = ["ChallengeRecord", "ChallengeRepository"]
