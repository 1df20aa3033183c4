"""km on the bus: thin handlers (decode -> authorize -> act -> encode) around :class:`Km`.

Every worker joins the ``iotdlm.km`` queue group, so N km processes share the subjects; the work
of one request runs in a worker thread, so the event loop keeps moving NATS traffic meanwhile.
Each worker also listens (outside the queue group) for the others' revocations, and runs the
schedule: full CRLs before they are due, audit checkpoints, purging expired nonces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from iotdlm.bus import Bus, Message, Subscription
from iotdlm.bus import subjects as s
from iotdlm.errors import IotdlmError, RejectedError
from iotdlm.km import audit
from iotdlm.km.core import Km
from iotdlm.pki.keys import PrivateKey
from iotdlm.wire import audit as fmt
from iotdlm.wire import km as msg

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    crl_check_every: float = 60.0
    checkpoint_every: float = 60.0
    purge_nonces_every: float = 300.0


class _RevokedEvent(msgspec.Struct, frozen=True):
    issuer: str
    serial: str


class KmService:
    def __init__(
        self,
        km: Km,
        bus: Bus,
        *,
        identity: tuple[PrivateKey, Any] | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        self.km = km
        self.bus = bus
        self.identity = identity  # (key, certificate) that signs audit checkpoints
        self.schedule = schedule
        self._subs: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        queue = s.queue_group("km")
        routes: dict[str, Callable[[Message], Any]] = {
            s.KM_ISSUE: lambda m: self.km.issue(m.data),
            s.KM_ISSUE_BATCH: lambda m: self.km.issue_batch(m.data),
            s.KM_RENEW: lambda m: self.km.renew(m.data),
            s.KM_CHAIN: lambda m: self.km.chain(),
            s.KM_GET: lambda m: self.km.get(msg.decode(m.data, msg.GetRequest)),
            s.KM_EST_SIMPLEENROLL: lambda m: self.km.est(m.data),
            s.KM_EST_SIMPLEREENROLL: lambda m: self.km.est(m.data),
            s.KM_EST_SERVERKEYGEN: lambda m: self.km.est(m.data),
            s.KM_EST_NONCE: lambda m: self.km.est_nonce(m.data),
        }
        if self.km.va is not None:
            routes[s.KM_CRL] = self._crl
        for subject, fn in routes.items():
            self._subs.append(await self.bus.serve(subject, self._wrap(subject, fn), queue=queue))
        if self.km.va is not None:
            self._subs.append(await self.bus.serve(s.KM_REVOKE, self._revoke, queue=queue))
            self._subs.append(await self.bus.serve(s.KM_OCSP, self._ocsp, queue=queue))
            self._subs.append(await self.bus.subscribe(s.KM_REVOKED_EVENT, self._on_revoked))
        if self.schedule is not None:
            self._tasks.append(asyncio.create_task(self._every(self.schedule.crl_check_every, self._refresh_crls)))
            self._tasks.append(asyncio.create_task(self._every(self.schedule.checkpoint_every, self._checkpoint)))
            self._tasks.append(asyncio.create_task(self._every(self.schedule.purge_nonces_every, self._purge)))
        log.info("km serving %d subjects", len(routes))

    # --- handlers -------------------------------------------------------------------------
    def _wrap(self, subject: str, fn: Callable[[Message], Any]) -> Callable[[Message], Any]:
        async def handler(m: Message) -> bytes:
            try:
                result = await asyncio.to_thread(fn, m)
            except RejectedError as exc:
                await asyncio.to_thread(self._audit_refusal, subject, exc)
                raise
            return result if isinstance(result, bytes) else msg.encode(result)

        return handler

    def _audit_refusal(self, subject: str, exc: RejectedError) -> None:
        with contextlib.suppress(IotdlmError):
            self.km.store.append_audit(
                [
                    audit.entry(
                        self.km.clock.now(),
                        fmt.REFUSED,
                        "km",
                        exc.device_id,
                        bus_subject=subject,
                        code=exc.code,
                        message=exc.message[:500],
                        field=exc.field,
                    )
                ]
            )

    async def _revoke(self, m: Message) -> bytes:
        try:
            out = await asyncio.to_thread(self.km.revoke, m.data)
        except RejectedError as exc:
            await asyncio.to_thread(self._audit_refusal, s.KM_REVOKE, exc)
            raise
        for rec in out.revoked:
            # the other workers drop their cached OCSP answers for it
            await self.bus.publish(s.KM_REVOKED_EVENT, msg.encode(_RevokedEvent(issuer=rec.issuer, serial=rec.serial)))
        return msg.encode(out)

    async def _ocsp(self, m: Message) -> bytes:
        """Cached answers straight from the event loop; everything else (nonce, first request for a
        certificate) in a worker thread, as it reads the database and signs."""
        va = self.km.va
        assert va is not None
        first = va.ocsp_cached(m.data)
        if isinstance(first, bytes):
            return first
        return await asyncio.to_thread(va.answer, first)

    def _crl(self, m: Message) -> bytes:
        assert self.km.va is not None
        req = msg.decode(m.data, msg.CrlRequest)
        return self.km.va.current_crl(req.issuer, req.partition, delta=req.delta).der

    async def _on_revoked(self, m: Message) -> None:
        assert self.km.va is not None
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError, ValueError):
            ev = msgspec.json.decode(m.data, type=_RevokedEvent)
            self.km.va.invalidate(ev.issuer, int(ev.serial, 16))

    # --- schedule ---------------------------------------------------------------------------
    async def _every(self, seconds: float, job: Callable[[], Any]) -> None:
        while True:
            try:
                await asyncio.to_thread(job)
            except IotdlmError as exc:
                log.warning("scheduled job %s failed: %s", getattr(job, "__name__", job), exc)
            await asyncio.sleep(seconds)

    def _refresh_crls(self) -> None:
        if self.km.va is not None:
            self.km.va.refresh_due()

    def _checkpoint(self) -> None:
        if self.identity is not None:
            audit.checkpoint(self.km.store, self.identity[0], self.identity[1], self.km.clock.now())

    def _purge(self) -> None:
        self.km.store.purge_nonces(self.km.clock.now())

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()
