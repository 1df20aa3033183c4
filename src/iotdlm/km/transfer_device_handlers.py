"""km's side of the device-facing trust-transfer routes (seed 003 VII-D; issue 13): cm relays what a
device sent with its TLS client certificate; these handlers find the device from that certificate
(:meth:`iotdlm.km.core.Km.presented`: ours, or an external factory certificate registered with CA2)
and act where the store is.

SP1 (handing over):
- ``message``: the device's per-device transfer message, as ``iotdlm transfer deliver`` kept it
  (:func:`keep_messages`); the device's status becomes fetched (a later status stays);
- ``fallback``: the device reports a permanent failure: its row becomes failed-fallback;
- ``refusal``: the device refused a transfer message (replayed, expired, altered, wrong signer,
  ...): one ``device_refusal`` audit record, and the refusal in the device's row of the transfer
  whose message it refused (else its newest unfinished one) for ``transfer status``; the status
  stays.

SP2 (taking over; the raURI):
- ``challenge``: a fresh nonce for the device's attestation, kept in the store (at most
  :data:`~iotdlm.transfer.attestation.MAX_CHALLENGES_PER_DEVICE` outstanding per device, single
  use, expiring after ``ttl``), so any km worker judges the answer, after a km restart too;
- ``evidence``: the signed measurement, judged by :func:`iotdlm.transfer.attestation.verify`
  against the reference SP1 shared: attested, or failed-fallback and refused (audited by km's
  service like every refusal);
- ``update`` / ``updated`` (the update server): the image the operator published for the transfer
  (:func:`publish_update`, ``DIR/transfer/updates/<transfer id>/``), and the device's report that
  it installed it (updated).

Only cm may ask (a signed envelope from the cm identity); a device asking for another device's
message is refused.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from iotdlm.bus import Message
from iotdlm.bus import subjects as s
from iotdlm.errors import BadRequestError, NotAuthorizedError, NotFoundError, UntrustedError
from iotdlm.km.audit import entry
from iotdlm.km.core import Km
from iotdlm.km.ra import ModulePrincipal, PresentedCredential
from iotdlm.store.challenges import ChallengeRecord
from iotdlm.store.transfer import TransferDeviceRecord
from iotdlm.transfer import attestation
from iotdlm.transfer import status as st
from iotdlm.transfer.storage import ChallengeStore, TransferDevicesStore, TransferStore
from iotdlm.wire import audit as fmt
from iotdlm.wire import transfer_device as w

SP1, SP2 = "sp1", "sp2"
#: statuses after which a device has nothing more to fetch
_DONE = frozenset({st.ENROLLED, st.REVOKED_AT_CA1})


def _detail(rec: TransferDeviceRecord) -> dict[str, Any]:
    try:
        out = json.loads(rec.detail)
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def _change(
    tables: TransferDevicesStore,
    role: str,
    tid: str,
    device_ids: Sequence[str],
    now: dt.datetime,
    *,
    status: str | None = None,
    per_device: Mapping[str, Mapping[str, Any]] | None = None,
    detail: Mapping[str, Any] | None = None,
) -> list[str]:
    """Merge ``detail`` (and each device's ``per_device``) into the rows, moving them to ``status``
    where that is forward (None: keep the status); returns the devices changed."""

    def change(rec: TransferDeviceRecord) -> TransferDeviceRecord | None:
        new = rec.status if status is None else status
        if not st.can_advance(rec.status, new):
            return None
        merged = _detail(rec)
        merged.update(detail or {})
        merged.update((per_device or {}).get(rec.device_id, {}))
        return TransferDeviceRecord(role, tid, rec.device_id, new, json.dumps(merged, sort_keys=True), now)

    return [r.device_id for r in tables.update_transfer_devices(role, tid, device_ids, change)]


def _kept_sha256(rec: TransferDeviceRecord) -> str:
    """SHA-256 (hex) of the transfer message kept in the row for the device to fetch, or ``""``."""
    kept = _detail(rec).get("message")
    return hashlib.sha256(base64.b64decode(kept)).hexdigest() if isinstance(kept, str) else ""


def keep_messages(tables: TransferDevicesStore, tid: str, messages: Mapping[str, bytes], now: dt.datetime) -> int:
    """SP1: keep each device's transfer message (``transfer deliver``) for the device to fetch at
    ``GET /transfer/message``; a newer message replaces an older one. Returns how many were kept."""
    per = {d: {"message": base64.b64encode(m).decode(), "message_at": now.isoformat()} for d, m in messages.items()}
    return len(_change(tables, SP1, tid, list(messages), now, per_device=per))


#: largest update image served through km (it travels in one signed NATS reply)
MAX_UPDATE_BYTES = 256 * 1024
UPDATE_IMAGE, UPDATE_INFO = "image", "info.json"


def publish_update(updates_dir: Path, tid: str, image: bytes, version: str) -> Path:
    """SP2: the image devices of transfer ``tid`` fetch at ``GET /transfer/update``."""
    if not image or len(image) > MAX_UPDATE_BYTES:
        raise BadRequestError(f"an update image served through cm is 1 to {MAX_UPDATE_BYTES} bytes")
    if not version or len(version) > 64 or any(ord(c) < 0x20 for c in version):
        raise BadRequestError("name the update's version (at most 64 printable characters)", field="version")
    d = updates_dir / tid
    d.mkdir(parents=True, exist_ok=True)
    (d / UPDATE_IMAGE).write_bytes(image)
    info = {"version": version, "sha256": hashlib.sha256(image).hexdigest()}
    (d / UPDATE_INFO).write_text(json.dumps(info, sort_keys=True))
    return d


class TransferDeviceHandlers:
    """The four relayed operations, on one km (its store, clock and certificate checks)."""

    def __init__(self, km: Km, tables: TransferStore | None = None, *,
                 entropy: Callable[[int], bytes] = secrets.token_bytes,
                 ttl: dt.timedelta = attestation.DEFAULT_TTL, updates_dir: Path | None = None,
                 challenges: ChallengeStore | None = None) -> None:  # fmt: skip
        self.km = km
        #: where SP2's operator published update images (None: this km serves no updates)
        self.updates_dir = updates_dir
        #: the transfer tables; by default km's own store (iotdlm.store.Store serves both: the
        #: check at the end of iotdlm.transfer.storage)
        self.tables: TransferStore = tables if tables is not None else cast("TransferStore", km.store)
        #: the outstanding attestation challenges; by default km's own store
        self.challenges: ChallengeStore = challenges if challenges is not None else cast("ChallengeStore", km.store)
        self.entropy = entropy
        self.ttl = ttl

    def routes(self) -> dict[str, Callable[[Message], Any]]:
        return {
            s.KM_TRANSFER_MESSAGE: lambda m: self.message(m.data),
            s.KM_TRANSFER_FALLBACK: lambda m: self.fallback(m.data),
            s.KM_TRANSFER_REFUSAL: lambda m: self.refusal(m.data),
            s.KM_TRANSFER_CHALLENGE: lambda m: self.challenge(m.data),
            s.KM_TRANSFER_EVIDENCE: lambda m: self.evidence(m.data),
            s.KM_TRANSFER_UPDATE: lambda m: self.update(m.data),
            s.KM_TRANSFER_UPDATED: lambda m: self.updated(m.data),
        }

    # --- shared steps -----------------------------------------------------------------------------
    def _from_cm(self, token: bytes, op: str) -> bytes:
        """The body of a request cm signed (its nonce spent: a replayed relay is refused)."""
        env, principal, nonce = self.km.authenticate(token, op)
        self.km.store.consume_nonce(nonce.sender, nonce.nonce, expires_at=nonce.expires_at)
        if not (isinstance(principal, ModulePrincipal) and principal.module == "cm"):
            raise NotAuthorizedError(f"{principal.describe()} may not relay transfer requests of devices (cm does)")
        return env.body

    def _device(self, client_certificate: bytes) -> PresentedCredential:
        cred = self.km.presented(client_certificate)
        if cred.status == "revoked":
            raise UntrustedError(
                f"the {cred.profile} certificate of device {cred.device_id} is revoked", device_id=cred.device_id
            )
        return cred

    def _rows_of(self, role: str, device_id: str) -> list[TransferDeviceRecord]:
        """The device's rows in this provider's transfers, newest transfer first."""
        out = []
        for t in self.tables.list_transfers(role):
            row = self.tables.get_transfer_devices(role, t.transfer_id, [device_id]).get(device_id)
            if row is not None:
                out.append(row)
        return out

    # --- SP1 --------------------------------------------------------------------------------------
    def message(self, token: bytes) -> w.MessageResponse:
        req = w.decode(self._from_cm(token, w.OP_MESSAGE), w.MessageRequest)
        cred = self._device(req.client_certificate)
        if req.device and req.device != cred.device_id:
            raise NotAuthorizedError(
                f"device {cred.device_id} asked for the transfer message of device {req.device[:80]!r}: "
                "a device fetches its own message only",
                device_id=cred.device_id,
                field="device",
            )
        for row in self._rows_of(SP1, cred.device_id):
            kept = _detail(row).get("message")
            if row.status in _DONE or not isinstance(kept, str):
                continue
            now = self.km.clock.now()
            _change(self.tables, SP1, row.transfer_id, [cred.device_id], now, status=st.FETCHED,
                    detail={"fetched": now.isoformat()})  # fmt: skip
            return w.MessageResponse(transfer=row.transfer_id, message=base64.b64decode(kept))
        raise NotFoundError(
            f"no transfer message waits for device {cred.device_id} (none was delivered, or it moved already)",
            device_id=cred.device_id,
        )

    def fallback(self, token: bytes) -> w.Done:
        req = w.decode(self._from_cm(token, w.OP_FALLBACK), w.FallbackRequest)
        cred = self._device(req.client_certificate)
        if not req.transfer or len(req.transfer) > w.MAX_TRANSFER_ID:
            raise BadRequestError("name the transfer (its id) the device falls back from", field="transfer")
        reason = " ".join(req.reason.split())[: w.MAX_REASON]
        if not reason:
            raise BadRequestError("say why the device falls back (reason)", field="reason")
        store = self.tables
        if store.get_transfer(SP1, req.transfer) is None:
            raise NotFoundError(f"no transfer {req.transfer[:64]} at this provider", device_id=cred.device_id)
        if cred.device_id not in store.get_transfer_devices(SP1, req.transfer, [cred.device_id]):
            raise NotAuthorizedError(
                f"device {cred.device_id} is not part of transfer {req.transfer[:64]}", device_id=cred.device_id
            )
        moved = _change(store, SP1, req.transfer, [cred.device_id], self.km.clock.now(), status=st.FAILED_FALLBACK,
                        detail={"fallback": reason})  # fmt: skip
        status = (
            st.FAILED_FALLBACK
            if moved
            else store.get_transfer_devices(SP1, req.transfer, [cred.device_id])[cred.device_id].status
        )
        return w.Done(transfer=req.transfer, device=cred.device_id, status=status)

    def refusal(self, token: bytes) -> w.Done:
        req = w.decode(self._from_cm(token, w.OP_REFUSAL), w.RefusalRequest)
        cred = self._device(req.client_certificate)
        if req.reason not in w.REFUSAL_REASONS:
            raise BadRequestError(f"unknown refusal reason {req.reason[:40]!r}", field="reason")
        if req.message and (len(req.message) != 64 or set(req.message) - set("0123456789abcdef")):
            raise BadRequestError("the refused message is named by its SHA-256 in lowercase hex", field="message")
        text = " ".join(req.detail.split())[: w.MAX_REFUSAL_DETAIL]
        rows = self._rows_of(SP1, cred.device_id)
        ours = [r for r in rows if req.message and _kept_sha256(r) == req.message]
        candidates = ours or [r for r in rows if r.status not in _DONE]
        row = candidates[0] if candidates else None
        now = self.km.clock.now()
        tid = row.transfer_id if row is not None else None
        self.tables.append_audit([
            entry(now, fmt.DEVICE_REFUSAL, "device", cred.device_id, reason=req.reason, detail=text,
                  message=req.message or None, transfer=tid, ours=bool(ours))
        ])  # fmt: skip
        if row is None:
            return w.Done(transfer="", device=cred.device_id, status="")

        def note(rec: TransferDeviceRecord) -> TransferDeviceRecord:
            d = st.with_refusal(_detail(rec), reason=req.reason, text=text, at=now.isoformat(), message=req.message)
            detail = json.dumps(d, sort_keys=True)
            return TransferDeviceRecord(SP1, rec.transfer_id, rec.device_id, rec.status, detail, now)

        done = self.tables.update_transfer_devices(SP1, row.transfer_id, [cred.device_id], note)
        return w.Done(transfer=row.transfer_id, device=cred.device_id, status=done[0].status if done else row.status)

    # --- SP2: the raURI -----------------------------------------------------------------------------
    def _sp2_row(self, device_id: str) -> TransferDeviceRecord:
        for row in self._rows_of(SP2, device_id):
            if row.status not in _DONE:
                return row
        raise NotFoundError(f"device {device_id} is not being taken over here", device_id=device_id)

    def challenge(self, token: bytes) -> w.ChallengeResponse:
        req = w.decode(self._from_cm(token, w.OP_CHALLENGE), w.ChallengeRequest)
        cred = self._device(req.client_certificate)
        row = self._sp2_row(cred.device_id)
        nonce = self.entropy(16)
        now = self.km.clock.now()
        c = attestation.challenge(cred.device_id, nonce, now, ttl=self.ttl)
        self.challenges.put_challenge(
            ChallengeRecord(c.device_id, c.nonce, now, c.expires), keep=attestation.MAX_CHALLENGES_PER_DEVICE
        )
        return w.ChallengeResponse(transfer=row.transfer_id, nonce=nonce)

    def evidence(self, token: bytes) -> w.Verdict:
        req = w.decode(self._from_cm(token, w.OP_EVIDENCE), w.EvidenceRequest)
        cred = self._device(req.client_certificate)
        claimed = attestation.peek_evidence(req.evidence)
        if claimed.device_id != cred.device_id:
            raise NotAuthorizedError(
                f"device {cred.device_id} sent evidence in the name of device {claimed.device_id[:80]!r}",
                device_id=cred.device_id,
            )
        row = self._sp2_row(cred.device_id)
        x = _detail(row)
        reference = None
        if isinstance(x.get("reference"), str) and isinstance(x.get("factory"), str):
            reference = attestation.Reference(cred.device_id, x["factory"], bytes.fromhex(x["reference"]))
        now = self.km.clock.now()
        # single use: the challenge the evidence answers is taken (deleted) whatever the verdict
        taken = self.challenges.take_challenge(cred.device_id, claimed.nonce)
        state = attestation.Challenge(cred.device_id, taken.nonce, taken.expires_at) if taken else None
        _spent, verdict = attestation.verify(state, req.evidence, now, reference=reference)
        if reference is not None:
            status = st.ATTESTED if verdict.ok else st.FAILED_FALLBACK
            _change(self.tables, SP2, row.transfer_id, [cred.device_id], now, status=status,
                    detail={"attestation": verdict.reason})  # fmt: skip
        if not verdict.ok:
            raise NotAuthorizedError(f"attestation refused: {verdict.reason}", device_id=cred.device_id)
        return w.Verdict(device=verdict.device_id, ok=True, reason=verdict.reason)

    # --- SP2: the update server -------------------------------------------------------------------
    def update(self, token: bytes) -> w.UpdateResponse:
        req = w.decode(self._from_cm(token, w.OP_UPDATE), w.UpdateRequest)
        cred = self._device(req.client_certificate)
        row = self._sp2_row(cred.device_id)
        d = self.updates_dir / row.transfer_id if self.updates_dir is not None else None
        if d is None or not (d / UPDATE_IMAGE).is_file():
            raise NotFoundError(f"no update is published for transfer {row.transfer_id}", device_id=cred.device_id)
        image = (d / UPDATE_IMAGE).read_bytes()
        try:
            info = json.loads((d / UPDATE_INFO).read_text())
            version = str(info["version"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise NotFoundError(f"the update of transfer {row.transfer_id} has no readable {UPDATE_INFO}") from exc
        now = self.km.clock.now()
        _change(self.tables, SP2, row.transfer_id, [cred.device_id], now, detail={"update_fetched": now.isoformat()})
        return w.UpdateResponse(
            transfer=row.transfer_id, image=image, version=version, sha256=hashlib.sha256(image).hexdigest()
        )

    def updated(self, token: bytes) -> w.Done:
        req = w.decode(self._from_cm(token, w.OP_UPDATED), w.UpdatedRequest)
        cred = self._device(req.client_certificate)
        row = self._sp2_row(cred.device_id)
        if req.transfer != row.transfer_id:
            raise NotAuthorizedError(
                f"device {cred.device_id} reported an update for transfer {req.transfer[:64]}, not its own",
                device_id=cred.device_id,
            )
        version = " ".join(req.version.split())[:64]
        moved = _change(self.tables, SP2, row.transfer_id, [cred.device_id], self.km.clock.now(), status=st.UPDATED,
                        detail={"update": version})  # fmt: skip
        return w.Done(transfer=row.transfer_id, device=cred.device_id, status=st.UPDATED if moved else row.status)


__all__ = ["MAX_UPDATE_BYTES", "TransferDeviceHandlers", "keep_messages", "publish_update"]
