"""SP1's side of provider to provider over HTTPS (issue 13, docs/adr/0011): the bus handlers cm
relays to, run by km's workers where the store is (:class:`iotdlm.km.service.KmService`'s
``extra_routes``). Thin: decode -> authorize -> act (:class:`~iotdlm.transfer.shell.Sp1Service`)
-> encode. Every refusal is audited (kind ``refused``, actor ``transfer``).

- ``update_info``: SP2's signed fetch request (:func:`iotdlm.transfer.peer.verify_fetch`: the
  certificate pinned at export, this transfer, fresh, its cti spent once, the offset cm relays)
  -> at most :attr:`~iotdlm.transfer.peer_parts.PeerLimits.part_bytes` of the UpdateInfoList that
  ``transfer export --serve`` left in ``DIR/transfer/outbox/<tid>.jws``, from that offset, and its
  size (docs/adr/0019: SP2 fetches a large one in parts);
- ``transfer_message``: SP2's TransferMessage -> :meth:`Sp1Service.accept`;
- ``confirmation``: SP2's confirmation -> :meth:`Sp1Service.revoke_old` with CA1 in this process
  (:class:`~iotdlm.transfer.shell.LocalRevoker`), devices revoked-at-CA1.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

from iotdlm.bus import Message
from iotdlm.bus import subjects as s
from iotdlm.clock import Clock
from iotdlm.errors import BadRequestError, NotFoundError, RejectedError, UntrustedError
from iotdlm.km.audit import entry
from iotdlm.km.va import Va
from iotdlm.transfer import peer
from iotdlm.transfer.identity import TransferIdentity, transfer_dir
from iotdlm.transfer.messages import (
    TYP_CONFIRMATION,
    TYP_TRANSFER_MESSAGE,
    peek_transfer_ref,
    rejected_summary,
    transfer_id,
)
from iotdlm.transfer.peer_parts import PeerLimits
from iotdlm.transfer.shell import SP1, LocalRevoker, Sp1Service
from iotdlm.transfer.sp1 import Sp1Transfer
from iotdlm.transfer.storage import BulkRevocationStore, TransferStore
from iotdlm.wire import audit as fmt

OUTBOX = "outbox"
Publish = Callable[[str, bytes], Awaitable[None]]


class PeerStore(TransferStore, BulkRevocationStore, Protocol):
    """What the handlers need of the store: the transfer tables, revocation, and replay nonces."""

    def consume_nonce(self, sender: str, nonce: str, *, expires_at: dt.datetime) -> None: ...


def outbox_path(root: Path, tid: str) -> Path:
    return transfer_dir(root) / OUTBOX / f"{peer.check_tid(tid)}.jws"


def publish_update_info(root: Path, tid: str, token: bytes) -> Path:
    """Make an exported UpdateInfoList available to the SP2 named in it, at cm (``export --serve``)."""
    path = outbox_path(root, tid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(token)
    return path


class AnnouncingRevoker(LocalRevoker):
    """CA1 revokes in this km worker (:class:`LocalRevoker`) and tells the other workers, as km's
    own revocations do (``events.km.revoked``: they drop their cached OCSP answers at once)."""

    def __init__(self, store: BulkRevocationStore, va: Va, clock: Clock, publish: Publish | None) -> None:
        super().__init__(store, va, clock)
        self.publish = publish

    async def revoke_operational(self, device_ids: Sequence[str], *, reason: str, actor: str) -> int:
        recs = await asyncio.to_thread(
            self.tables.revoke_for_devices, device_ids, profile="operational", issuer="operational",
            reason=reason, at=self.clock.now(), actor=actor,
        )  # fmt: skip
        await asyncio.to_thread(self.va.revoked, recs)
        if self.publish is not None:
            for rec in recs:
                event = {"issuer": rec.issuer, "serial": format(rec.serial, "x")}
                await self.publish(s.KM_REVOKED_EVENT, json.dumps(event).encode())
        return len(recs)


class PeerHandlers:
    """SP1's transfer handlers on km's bus (see the module doc)."""

    def __init__(
        self,
        *,
        root: Path,
        store: PeerStore,
        identity: TransferIdentity,
        clock: Clock,
        va: Va,
        fallback_uri: str,
        publish: Publish | None = None,
        limits: PeerLimits | None = None,
    ) -> None:
        """``publish``: km's bus, to announce the revocations to the other km workers."""
        self.root = root
        self.limits = limits or PeerLimits()
        self.publish = publish
        self.store = store
        self.clock = clock
        self.va = va
        self.sp1 = Sp1Service(store=store, identity=identity, clock=clock, fallback_uri=fallback_uri)

    def routes(self) -> dict[str, Callable[[Message], Awaitable[bytes]]]:
        return {
            s.KM_TRANSFER_PEER_UPDATE_INFO: self.update_info,
            s.KM_TRANSFER_PEER_TRANSFER_MESSAGE: self.transfer_message,
            s.KM_TRANSFER_PEER_CONFIRMATION: self.confirmation,
        }

    def _refused(self, what: str, tid: str | None, exc: RejectedError) -> None:
        self.store.append_audit(
            [entry(self.clock.now(), fmt.REFUSED, "transfer", tid, what=what, **rejected_summary(exc))]
        )

    # --- update-info --------------------------------------------------------------------------
    async def update_info(self, m: Message) -> bytes:
        return await asyncio.to_thread(self._update_info, m.data)

    def _update_info(self, data: bytes) -> bytes:
        tid: str | None = None
        try:
            req = peer.decode_request(data)
            tid = req.transfer_id
            rec = self.store.get_transfer(SP1, tid)
            if rec is None:
                raise NotFoundError(f"no transfer {tid} handed over from here", field="transfer")
            t = Sp1Transfer.from_json(rec.state)
            now = self.clock.now()
            fetch = peer.verify_fetch(
                req.body.decode("ascii", "replace"),
                transfer_id=tid,
                provider_id=t.provider_id,
                peer_id=t.peer_id,
                pinned=t.peer,
                now=now,
            )
            if fetch.offset != req.offset:
                raise UntrustedError(
                    f"the fetch request asks for byte {fetch.offset} on, the relay for byte {req.offset} on",
                    field="offset",
                )
            self.store.consume_nonce(
                f"transfer:{t.peer_id}"[:64], fetch.cti.hex(), expires_at=fetch.issued_at + peer.FETCH_WINDOW
            )
            total, part = self._part(tid, req.offset)
        except RejectedError as exc:
            self._refused("update-info request", tid, exc)
            raise
        return peer.encode(
            peer.PeerReply(transfer_id=tid, body=part, summary="UpdateInfoList", offset=req.offset, total=total)
        )

    def _part(self, tid: str, offset: int) -> tuple[int, bytes]:
        """(size of the UpdateInfoList, at most ``part_bytes`` of it from ``offset``): memory and
        the reply stay bounded however large the fleet (docs/adr/0019)."""
        path = outbox_path(self.root, tid)
        try:
            with path.open("rb") as f:
                total = os.fstat(f.fileno()).st_size
                if offset >= total:
                    raise BadRequestError(
                        f"byte {offset} is past the end of transfer {tid}'s UpdateInfoList ({total} bytes)",
                        field="offset",
                    )
                f.seek(offset)
                return total, f.read(self.limits.part_bytes)
        except FileNotFoundError:
            raise NotFoundError(
                f"transfer {tid}'s UpdateInfoList is not served here: SP1 exports it with --serve", field="transfer"
            ) from None

    # --- SP2's signed CWTs ----------------------------------------------------------------------
    def _for_this_transfer(self, req: peer.PeerRequest, typ: int, what: str) -> None:
        """The CWT posted at /transfer/{tid}/... must answer transfer {tid} (audited if not)."""
        try:
            named = transfer_id(peek_transfer_ref(req.body, typ=typ))
            if named != req.transfer_id:
                raise UntrustedError(f"the {what} is for transfer {named}, not {req.transfer_id}", field="transfer")
        except RejectedError as exc:
            self._refused(what, req.transfer_id, exc)
            raise

    async def transfer_message(self, m: Message) -> bytes:
        req = peer.decode_request(m.data)
        await asyncio.to_thread(self._for_this_transfer, req, TYP_TRANSFER_MESSAGE, "TransferMessage")
        tm = await asyncio.to_thread(self.sp1.accept, req.body)
        summary = f"TransferMessage accepted; devices enroll at {tm.claims.enroll_uri}"
        return peer.encode(peer.PeerReply(transfer_id=req.transfer_id, summary=summary))

    async def confirmation(self, m: Message) -> bytes:
        req = peer.decode_request(m.data)
        await asyncio.to_thread(self._for_this_transfer, req, TYP_CONFIRMATION, "confirmation")
        done = await self.sp1.revoke_old(req.body, AnnouncingRevoker(self.store, self.va, self.clock, self.publish))
        return peer.encode(peer.PeerReply(transfer_id=req.transfer_id, summary=f"{len(done)} device(s) revoked-at-CA1"))


__all__ = ["OUTBOX", "AnnouncingRevoker", "PeerHandlers", "PeerStore", "outbox_path", "publish_update_info"]
