"""km on the bus: thin handlers (decode -> authorize -> act -> encode) around :class:`Km`.

Every worker joins the ``iotdlm.km`` queue group, so N km processes share the subjects; the work
of one request runs in a worker thread, so the event loop keeps moving NATS traffic meanwhile --
except, with ``on_loop``, the single-certificate requests (:data:`ON_LOOP_SUBJECTS`) and OCSP
answers signed on demand, which are answered on the event loop itself: with the store in a local
SQLite file and the CA keys in memory such a request never waits on anything but CPU and SQLite's
write lock, and two busy threads in one process cost more CPU in handing the GIL to each other
than the work itself (ADR 0032).
Each worker also listens (outside the queue group) for the others' revocations, and runs the
schedule: full CRLs before they are due, audit checkpoints, purging expired nonces.

Signed replies (ADR 0006): with an ``identity`` (km's service certificate and key, as ``iotdlm``
runs it) every reply on the API subjects -- result or error -- is a JWS signed by km and bound to
the request it answers (:meth:`iotdlm.wire.envelope.Sealer.seal_reply`), so a module can tell km's
answer from a forged one. OCSP responses and CRLs travel as they are: the CA signed them already.
Without an identity (unit-test harnesses) replies are plain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from iotdlm.aio import stop_serving
from iotdlm.bus import Bus, Message, Subscription
from iotdlm.bus import subjects as s
from iotdlm.bus.api import AppendOnlyStream
from iotdlm.errors import InternalError, IotdlmError, NotFoundError, RejectedError
from iotdlm.km import audit
from iotdlm.km.core import Km
from iotdlm.km.groupcommit import run_on_loop
from iotdlm.km.transfer_device_handlers import TransferDeviceHandlers
from iotdlm.observe.metrics import ModuleMetrics
from iotdlm.pki.keys import PrivateKey
from iotdlm.wire import audit as fmt
from iotdlm.wire import km as msg
from iotdlm.wire import merkle
from iotdlm.wire.envelope import Sealer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    crl_check_every: float = 60.0
    checkpoint_every: float = 60.0
    purge_nonces_every: float = 300.0


#: answered as they are, without km's reply signature: OCSP responses and CRLs are signed by the CA,
#: an audit tree head by km itself
UNSIGNED_SUBJECTS = frozenset({s.KM_CRL, s.KM_OCSP, s.KM_AUDIT_CHECKPOINT})

#: with ``on_loop``, answered on the event loop (ADR 0032): one certificate, or none, per request,
#: so each holds the loop for about a millisecond (and OCSP answers signed on demand, see ``_ocsp``).
#: Batches, server-side key generation (an RSA key takes a while), revocations, audit proofs and the
#: transfer's handlers stay in worker threads.
ON_LOOP_SUBJECTS = frozenset(
    {
        s.KM_ISSUE,
        s.KM_RENEW,
        s.KM_EST_SIMPLEENROLL,
        s.KM_EST_SIMPLEREENROLL,
        s.KM_EST_NONCE,
        s.KM_GET,
        s.KM_CHAIN,
        s.KM_FACTORY_CAS,
    }
)

#: an answer on the loop that took this long (seconds) is logged: the worker's other answers waited
SLOW_ON_LOOP_S = 0.5


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
        anchor_dir: Path | None = None,
        heads_stream: bool = True,
        extra_routes: Mapping[str, Callable[[Message], Awaitable[bytes]]] | None = None,
        transfer_updates: Path | None = None,
        metrics: ModuleMetrics | None = None,
        on_loop: bool = False,
    ) -> None:
        self.km = km
        self.bus = bus
        self.identity = identity  # (key, certificate) that signs audit checkpoints and replies
        self._sealer = Sealer(identity[0], identity[1]) if identity is not None else None
        self.schedule = schedule
        self.anchor_dir = anchor_dir  # where each signed audit tree head is also kept (outside the database)
        self._tree = merkle.CompactRange()  # the audit log's Merkle tree as far as this worker has read it
        #: publish every tree head this worker signs to the append-only stream (the third anchor)
        self.heads_stream = heads_stream
        self._heads: AppendOnlyStream | None = None
        self._unpublished: fmt.TreeHead | None = None  # a head the stream did not take yet
        self.transfer_updates = transfer_updates  # SP2's published update images (issue 13)
        self._subs: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        #: subjects served beside km's own, with km's signed replies (the trust transfer's handlers)
        self.extra_routes = dict(extra_routes or {})
        #: issuance by profile, refusals by code, OCSP answers, CRL generations (docs/adr/0018)
        self.metrics = metrics
        #: answer :data:`ON_LOOP_SUBJECTS` on the event loop, not in a worker thread (ADR 0032):
        #: for a store in a local SQLite file and CA keys in memory (``km serve`` decides)
        self.on_loop = on_loop

    async def start(self) -> None:
        queue = s.queue_group("km")
        routes: dict[str, Callable[[Message], Any]] = {
            s.KM_ISSUE: lambda m: self.km.issue(m.data),
            s.KM_ISSUE_BATCH: lambda m: self.km.issue_batch(m.data),
            s.KM_RENEW: lambda m: self.km.renew(m.data),
            s.KM_CHAIN: lambda m: self.km.chain(),
            s.KM_FACTORY_CAS: lambda m: self.km.factory_cas(),
            s.KM_AUDIT_CHECKPOINT: lambda m: self._latest_tree_head(),
            s.KM_AUDIT_CONSISTENCY: self._consistency,
            s.KM_GET: lambda m: self.km.get(msg.decode(m.data, msg.GetRequest)),
            s.KM_EST_SIMPLEENROLL: lambda m: self.km.est(m.data),
            s.KM_EST_SIMPLEREENROLL: lambda m: self.km.est(m.data),
            s.KM_EST_SERVERKEYGEN: lambda m: self.km.est(m.data),
            s.KM_EST_NONCE: lambda m: self.km.est_nonce(m.data),
        }
        if self.km.va is not None:
            routes[s.KM_CRL] = self._crl
        # issue 13: the device-facing transfer routes
        self.transfer_device = TransferDeviceHandlers(self.km, updates_dir=self.transfer_updates)
        routes.update(self.transfer_device.routes())
        for subject, fn in routes.items():
            self._subs.append(await self.bus.serve(subject, self._wrap(subject, fn), queue=queue))
        for subject, handler in self.extra_routes.items():
            self._subs.append(await self.bus.serve(subject, self._signed(subject, handler), queue=queue))
        if self.km.va is not None:
            self._subs.append(await self.bus.serve(s.KM_REVOKE, self._signed(s.KM_REVOKE, self._revoke), queue=queue))
            self._subs.append(await self.bus.serve(s.KM_OCSP, self._ocsp, queue=queue))
            self._subs.append(await self.bus.subscribe(s.KM_REVOKED_EVENT, self._on_revoked))
        if self.heads_stream:
            self._heads = await self.bus.append_only_stream(s.AUDIT_HEADS_STREAM, s.AUDIT_TREE_HEAD)
        if self.schedule is not None:
            self._tasks.append(asyncio.create_task(self._every(self.schedule.crl_check_every, self._refresh_crls)))
            self._tasks.append(asyncio.create_task(self._every(self.schedule.checkpoint_every, self.checkpoint_now)))
            self._tasks.append(asyncio.create_task(self._every(self.schedule.purge_nonces_every, self._purge)))
        log.info("km serving %d subjects", len(routes))

    # --- handlers -------------------------------------------------------------------------
    def _wrap(self, subject: str, fn: Callable[[Message], Any]) -> Callable[[Message], Any]:
        """``fn`` run in a worker thread (or on the loop: ``on_loop``, ADR 0032); its result
        encoded and, on the signed subjects, sealed by km in the same thread (one hop off the event
        loop per request, issue 15)."""
        sealer = None if subject in UNSIGNED_SUBJECTS else self._sealer
        on_loop = self.on_loop and subject in ON_LOOP_SUBJECTS

        def work(m: Message) -> bytes:
            start = time.perf_counter()
            try:
                result = fn(m)
            except RejectedError as exc:
                self._audit_refusal(subject, exc)
                raise
            if self.metrics is not None:
                self.metrics.issued_from(result, time.perf_counter() - start)
            body = result if isinstance(result, bytes) else msg.encode(result)
            if sealer is None:
                return body
            return sealer.seal_reply(subject, m.data, body, error=False, now=self.km.clock.now())

        async def handler(m: Message) -> bytes:
            if not on_loop:
                return await asyncio.to_thread(work, m)
            start = time.perf_counter()
            try:
                # in a greenlet: its commit is written with those of the requests that came with it
                return await run_on_loop(work, m)
            finally:
                took = time.perf_counter() - start
                if took >= SLOW_ON_LOOP_S:
                    log.warning(
                        "km took %.1f s to answer %s on its event loop, and this worker answered nothing else "
                        "meanwhile: is another process holding the database's write lock (a long write)?",
                        took,
                        subject,
                    )

        # a CRL is signed by its CA already, and its consumers verify that (ADR 0006)
        return handler if sealer is None else self._signed(subject, handler, sealed=True, on_loop=on_loop)

    def _signed(
        self, subject: str, handler: Callable[[Message], Any], *, sealed: bool = False, on_loop: bool = False
    ) -> Callable[[Message], Any]:
        """``handler`` with its result and its errors sealed by km (ADR 0006); as is without an
        identity. One signature per reply, in a worker thread (``on_loop``: on the loop). ``sealed``:
        the handler seals its results itself, only its errors are sealed here."""
        sealer = self._sealer
        if sealer is None:
            return handler

        async def signed(m: Message) -> bytes:
            try:
                body, error = await handler(m), False
                if sealed:
                    assert isinstance(body, bytes)
                    return body
            except IotdlmError as exc:
                body, error = msgspec.json.encode(exc.to_wire()), True
                if self.metrics is not None:  # sealed, so the bus never sees it raised
                    self.metrics.refused(exc.code)
            except Exception:
                # the bus would log and hide it the same way; signed, so the client believes it
                log.exception("km handler for %s failed", subject)
                body, error = msgspec.json.encode(InternalError("km failed to answer; see its log").to_wire()), True
            now = self.km.clock.now()
            return await asyncio.to_thread(sealer.seal_reply, subject, m.data, body, error=error, now=now)

        return signed

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
        certificate) in a worker thread, as it reads the database and signs -- or, with
        ``on_loop``, on the loop too (one read of a local SQLite file and one signature by an
        in-memory responder key, ADR 0025 and 0032)."""
        va = self.km.va
        assert va is not None
        first = va.ocsp_cached(m.data)
        if self.metrics is not None:
            self.metrics.ocsp.labels("cache" if isinstance(first, bytes) else "signed").inc()
        if isinstance(first, bytes):
            return first
        if self.on_loop:
            return va.answer(first)
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
                if asyncio.iscoroutinefunction(job):
                    await job()
                else:
                    await asyncio.to_thread(job)
            except IotdlmError as exc:
                log.warning("scheduled job %s failed: %s", getattr(job, "__name__", job), exc)
            await asyncio.sleep(seconds)

    def _refresh_crls(self) -> None:
        if self.km.va is not None:
            made = self.km.va.refresh_due()
            if self.metrics is not None:
                self.metrics.crls.inc(made)

    async def checkpoint_now(self) -> None:
        """Sign a tree head when the log has grown (the database, the anchor folder), then append
        it to the append-only stream; a head the stream did not take is tried again next time,
        unless a newer one replaces it."""
        if self.identity is None:
            return
        key, cert = self.identity
        cp = await asyncio.to_thread(
            audit.checkpoint,
            self.km.store,
            key,
            cert,
            self.km.clock.now(),
            anchor_dir=self.anchor_dir,
            cache=self._tree,
        )
        if cp is not None:
            self._unpublished = audit.to_tree_head(cp)
        await self.publish_head()

    async def publish_head(self) -> None:
        """Append the newest tree head this worker signed to the stream, if it is not there yet."""
        th = self._unpublished
        if th is None or self._heads is None:
            return
        try:
            await self._heads.append(fmt.encode_tree_head(th))
        except IotdlmError as exc:
            log.warning("the audit tree head of record %d is not in stream %s yet: %s", th.size, self._heads.name, exc)
            return
        if self._unpublished is th:
            self._unpublished = None

    def _consistency(self, m: Message) -> bytes:
        req = fmt.decode_consistency_request(m.data)
        return fmt.encode_consistency_proof(audit.consistency(self.km.store, req.first, req.second))

    def _latest_tree_head(self) -> bytes:
        """The newest signed tree head, with the signer's certificate so that an outside witness
        holding only the service CA can check it."""
        cp = self.km.store.latest_audit_checkpoint()
        if cp is None or cp.root is None:
            raise NotFoundError("the audit log has no signed tree head yet")
        own = self.identity[1] if self.identity is not None else None
        return fmt.encode_tree_head(
            audit.to_tree_head(cp, certificate=audit.signer_certificate(self.km.store, cp, own))
        )

    def _purge(self) -> None:
        self.km.store.purge_nonces(self.km.clock.now())

    async def stop(self) -> None:
        await stop_serving(self._tasks, self._subs, what="km tasks")
