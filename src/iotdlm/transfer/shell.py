"""Trust transfer at a provider (the I/O shell around :mod:`~iotdlm.transfer.sp1`,
:mod:`~iotdlm.transfer.sp2` and :mod:`~iotdlm.transfer.attestation`): load state from the store,
run the pure machine, carry out its effects (store, audit, CA2 registration, CA1 revocation,
delivery), save.

Seams (house style: injected, never global):

- :class:`Delivery` -- how SP1's per-device messages reach the device agents. In a deployment that
  is cm (the only door to the outside); tests and benches deliver to the agents directly.
- :class:`Registrar` -- CA2's registration of an x5bag (:class:`iotdlm.km.registry.FactoryRegistry`
  in-process when SP2 runs CA2 itself; a km over the bus otherwise).
- :class:`Revoker` -- CA1 revoking the old operational certificates: through a running km
  (:class:`KmRevoker`, every km worker drops its cached OCSP answer at once) or directly in the
  store with the VA (:class:`LocalRevoker`, batched: one delta CRL per partition for the lot).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NotRequired, Protocol, TypedDict, TypeVar, Unpack

from cryptography import x509

from iotdlm.clock import Clock
from iotdlm.errors import ConflictError, IotdlmError, NotFoundError, RejectedError
from iotdlm.km.audit import entry
from iotdlm.km.registry import Registration
from iotdlm.km.va import Va
from iotdlm.store import CertRecord
from iotdlm.store.transfer import TransferDeviceRecord, TransferRecord
from iotdlm.transfer import attestation, sp1, sp2
from iotdlm.transfer import status as st
from iotdlm.transfer.identity import TransferIdentity
from iotdlm.transfer.messages import (
    MAX_CONFIRMATION_BYTES,
    MAX_DEVICES,
    TYP_CONFIRMATION,
    TYP_TRANSFER_MESSAGE,
    Enrolled,
    TransferClaims,
    TransferMessage,
    VersionInfo,
    epoch,
    from_epoch,
    peek_transfer_ref,
    rejected_summary,
    transfer_id,
)
from iotdlm.transfer.storage import BulkRevocationStore, HeldCertificatesStore, TransferDevicesStore, TransferStore
from iotdlm.transfer.trust import cert_der
from iotdlm.wire import audit as fmt

SP1 = "sp1"
SP2 = "sp2"
#: RFC 5280 reason for the old operational certificates: the device left SP1's domain
REVOCATION_REASON = "affiliationChanged"
Entropy = Callable[[int], bytes]


@dataclass(frozen=True)
class Receipt:
    """What a device agent answered to a delivered transfer message."""

    device_id: str
    accepted: bool
    phase: str = ""
    detail: str = ""


class Delivery(Protocol):
    async def deliver(self, device_id: str, token: bytes) -> Receipt: ...


class Registrar(Protocol):
    def register(
        self,
        x5bag: bytes,
        *,
        actor: str,
        batch: str,
        windows: Mapping[str, tuple[dt.datetime, dt.datetime]] | None = None,
        dtype: str | None = None,
    ) -> Registration: ...


class Revoker(Protocol):
    async def revoke_operational(self, device_ids: Sequence[str], *, reason: str, actor: str) -> int: ...


class LocalRevoker:
    """Revoke in the store with the VA of this process (batched; needs the CA keys for CRLs)."""

    def __init__(self, store: BulkRevocationStore, va: Va, clock: Clock) -> None:
        self.tables = store
        self.va = va
        self.clock = clock

    async def revoke_operational(self, device_ids: Sequence[str], *, reason: str, actor: str) -> int:
        recs = await asyncio.to_thread(
            self.tables.revoke_for_devices,
            device_ids,
            profile="operational",
            issuer="operational",
            reason=reason,
            at=self.clock.now(),
            actor=actor,
        )
        await asyncio.to_thread(self.va.revoked, recs)
        return len(recs)


class KmRevokeClient(Protocol):
    async def revoke(
        self, *, serial: str | None = None, issuer: str | None = None, reason: str | None = None
    ) -> Sequence[object]: ...


class KmRevoker:
    """Revoke through a running km (the admin identity's KmClient), one certificate at a time."""

    def __init__(self, km: KmRevokeClient, store: HeldCertificatesStore) -> None:
        self.km = km
        self.tables = store

    async def revoke_operational(self, device_ids: Sequence[str], *, reason: str, actor: str) -> int:
        held = await asyncio.to_thread(
            self.tables.certificates_of, device_ids, profile="operational", issuer="operational",
            statuses=("valid", "superseded"),
        )  # fmt: skip
        n = 0
        for recs in held.values():
            for rec in recs:
                await self.km.revoke(serial=format(rec.serial, "x"), issuer="operational", reason=reason)
                n += 1
        return n


def _detail(rec: TransferDeviceRecord | None) -> dict[str, Any]:
    if rec is None:
        return {}
    try:
        out = json.loads(rec.detail)
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


class _Tracker:
    """Per-device statuses of one role's transfers (transfer_devices rows)."""

    def __init__(self, tables: TransferDevicesStore, role: str, clock: Clock) -> None:
        self.tables = tables
        self.role = role
        self.clock = clock

    def add(self, tid: str, details: Mapping[str, Mapping[str, Any]]) -> None:
        now = self.clock.now()
        self.tables.put_transfer_devices(
            [
                TransferDeviceRecord(self.role, tid, d, st.PENDING, json.dumps(dict(x), sort_keys=True), now)
                for d, x in details.items()
            ]
        )

    def rows(self, tid: str, device_ids: Sequence[str] | None = None) -> dict[str, TransferDeviceRecord]:
        return self.tables.get_transfer_devices(self.role, tid, device_ids)

    def set(
        self,
        tid: str,
        device_ids: Sequence[str],
        status: str,
        *,
        detail: Mapping[str, Any] | None = None,
        per_device: Mapping[str, Mapping[str, Any]] | None = None,
        only_from: frozenset[str] | None = None,
    ) -> list[str]:
        """Move devices to ``status`` where the move is forward (stale reports are ignored);
        returns the devices that moved. One write transaction."""
        now = self.clock.now()

        def change(rec: TransferDeviceRecord) -> TransferDeviceRecord | None:
            if only_from is not None and rec.status not in only_from:
                return None
            if not st.can_advance(rec.status, status):
                return None
            merged = _detail(rec)
            merged.update(detail or {})
            merged.update((per_device or {}).get(rec.device_id, {}))
            return TransferDeviceRecord(
                self.role, rec.transfer_id, rec.device_id, status, json.dumps(merged, sort_keys=True), now
            )

        moved = self.tables.update_transfer_devices(self.role, tid, device_ids, change)
        return [r.device_id for r in moved]


_T = TypeVar("_T", sp1.Sp1Transfer, sp2.Sp2Transfer)


class Seams(TypedDict):
    """What SP1 and SP2 are built on, besides their own seam: their store, identity and clock, and
    the entropy of their nonces (default: the OS's)."""

    store: TransferStore
    identity: TransferIdentity
    clock: Clock
    entropy: NotRequired[Entropy]


class _Provider(Generic[_T]):
    """What SP1 and SP2 share: their tables, identity, clock and entropy, the per-device tracker,
    and loading and saving the state of their pure machine (:mod:`~iotdlm.transfer.sp1`,
    :mod:`~iotdlm.transfer.sp2`) by transfer id."""

    def __init__(
        self,
        role: str,
        parse: Callable[[str], _T],
        *,
        store: TransferStore,
        identity: TransferIdentity,
        clock: Clock,
        entropy: Entropy = secrets.token_bytes,
    ) -> None:
        self.role = role
        self._parse: Callable[[str], _T] = parse
        self.store = store
        self.tables = store
        self.identity = identity
        self.clock = clock
        self.entropy = entropy
        self.devices = _Tracker(self.tables, role, clock)

    def _load(self, tid: str) -> _T:
        rec = self.tables.get_transfer(self.role, tid)
        if rec is None:
            raise NotFoundError(f"no transfer {tid} at this provider (as {self.role.upper()})", field="transfer")
        return self._parse(rec.state)

    def _save(self, t: _T) -> None:
        self.tables.save_transfer(TransferRecord(self.role, t.transfer_id, t.to_json(), t.created_at, self.clock.now()))

    def transfers(self) -> list[TransferRecord]:
        return self.tables.list_transfers(self.role)

    def status(self, tid: str) -> dict[str, TransferDeviceRecord]:
        return self.devices.rows(tid)


# --- SP1 ------------------------------------------------------------------------------------------------
class Sp1Service(_Provider[sp1.Sp1Transfer]):
    """The provider handing its fleet over, on its own deployment (CA1 = its operational CA)."""

    def __init__(self, *, fallback_uri: str, **seams: Unpack[Seams]) -> None:
        super().__init__(SP1, sp1.Sp1Transfer.from_json, **seams)
        self.fallback_uri = fallback_uri

    def _refused(self, what: str, tid: str | None, exc: RejectedError) -> None:
        """FR2/FR1 refusals at SP1 go into the hash-chained audit log."""
        self.store.append_audit(
            [entry(self.clock.now(), fmt.REFUSED, "transfer", tid, what=what, **rejected_summary(exc))]
        )

    def export(
        self,
        device_ids: Sequence[str],
        *,
        peer_id: str,
        peer_certificate: x509.Certificate,
        not_before: dt.datetime,
        not_after: dt.datetime,
        version: Callable[[str], VersionInfo],
        references: Mapping[str, bytes] | None = None,
    ) -> tuple[str, bytes]:
        """The signed UpdateInfoList of ``device_ids`` (their factory certificates from CA1's
        records) for SP2; the devices are tracked as pending. Returns (transfer id, JWS)."""
        now = self.clock.now()
        held = self.tables.certificates_of(device_ids, profile="factory", issuer="factory")
        missing = [d for d in device_ids if d not in held]
        if missing:
            raise NotFoundError(
                f"{len(missing)} device(s) hold no valid factory certificate here: {', '.join(missing[:5])}",
                device_id=missing[0],
            )
        devices = [
            sp1.ExportDevice(
                device_id=d,
                factory_certificate=max(held[d], key=lambda r: r.created_at).der,
                not_before=not_before,
                not_after=not_after,
                version=version(d),
                ra_reference=(references or {}).get(d),
            )
            for d in device_ids
        ]
        t, token = sp1.export(
            devices,
            provider_id=self.identity.provider_id,
            peer_id=peer_id,
            peer_certificate=peer_certificate,
            now=now,
            key=self.identity.key,
            certificate=self.identity.certificate,
        )
        self._save(t)
        self.devices.add(t.transfer_id, {d: {"window": [epoch(not_before), epoch(not_after)]} for d in device_ids})
        return t.transfer_id, token

    def accept(self, token: bytes) -> TransferMessage:
        """SP2's TransferMessage (VII-D: "it validates the signature, parses the set of claims").
        A refusal is audited here and raised."""
        tid: str | None = None
        try:
            tid = transfer_id(peek_transfer_ref(token, typ=TYP_TRANSFER_MESSAGE))
            t = self._load(tid)
        except RejectedError as exc:
            self._refused("TransferMessage", tid, exc)
            raise
        new, effects = sp1.on_transfer_message(t, token, self.clock.now())
        for e in effects:
            if isinstance(e, sp1.Refused):
                self._refused(e.what, t.transfer_id, e.error)
                raise e.error
        self._save(new)
        assert new.accepted is not None
        return new.accepted

    def device_messages(self, tid: str, *, with_chain: bool = False) -> tuple[dict[str, bytes], dict[str, str]]:
        """One signed CWT per device still to move (pending, reset, failed-fallback). The signer is
        named by x5t: devices hold SP1's transfer certificate and its CA in their truststore;
        ``with_chain`` sends the x5chain instead (about 1 KB more) for devices that do not."""
        t = self._load(tid)
        rows = self.devices.rows(tid)
        windows: dict[str, tuple[dt.datetime, dt.datetime]] = {}
        for d, rec in rows.items():
            if rec.status in (st.ENROLLED, st.REVOKED_AT_CA1):
                continue
            w = _detail(rec).get("window")
            if isinstance(w, list) and len(w) == 2:
                windows[d] = (from_epoch(int(w[0])), from_epoch(int(w[1])))
        return sp1.device_messages(
            t,
            windows,
            self.clock.now(),
            signer=self.identity.signer(with_chain=with_chain),
            fallback_uri=self.fallback_uri,
            entropy=self.entropy,
        )

    async def deliver(
        self, tid: str, messages: Mapping[str, bytes], delivery: Delivery, *, concurrency: int = 32
    ) -> dict[str, Receipt]:
        """Hand each device its message (VII-D); a device that accepted it has reset."""
        sem = asyncio.Semaphore(concurrency)

        async def one(device_id: str, token: bytes) -> Receipt:
            async with sem:
                try:
                    return await delivery.deliver(device_id, token)
                except IotdlmError as exc:
                    return Receipt(device_id, False, detail=f"{exc.code}: {exc.message}")

        receipts = await asyncio.gather(*(one(d, m) for d, m in messages.items()))
        out = {r.device_id: r for r in receipts}
        accepted = [r.device_id for r in receipts if r.accepted]
        refused = {r.device_id: {"delivery": r.detail} for r in receipts if not r.accepted}
        await asyncio.to_thread(
            self.devices.set, tid, accepted, st.RESET, only_from=frozenset({st.PENDING}),
        )  # fmt: skip
        if refused:
            await asyncio.to_thread(
                self.devices.set, tid, list(refused), st.PENDING, per_device=refused,
                only_from=frozenset({st.PENDING}),
            )  # fmt: skip
        return out

    def fallback(self, tid: str, device_id: str, reason: str) -> None:
        """A device fell back and told SP1 (its fallback URI, VII-D): it works under SP1 again."""
        self.devices.set(tid, [device_id], st.FAILED_FALLBACK, detail={"fallback": reason[:500]})

    async def revoke_old(self, token: bytes, revoker: Revoker) -> list[str]:
        """SP2's confirmation -> CA1 revokes the confirmed devices' old operational certificates
        (FR1: the device keeps no valid SP1 credential). Returns the devices revoked-at-CA1."""
        tid: str | None = None
        try:
            tid = transfer_id(peek_transfer_ref(token, typ=TYP_CONFIRMATION))
            t = await asyncio.to_thread(self._load, tid)
        except RejectedError as exc:
            await asyncio.to_thread(self._refused, "confirmation", tid, exc)
            raise
        rows = await asyncio.to_thread(self.devices.rows, t.transfer_id)
        new, effects = sp1.on_confirmation(t, token, self.clock.now(), devices=frozenset(rows))
        done: list[str] = []
        for e in effects:
            if isinstance(e, sp1.Refused):
                await asyncio.to_thread(self._refused, e.what, t.transfer_id, e.error)
                raise e.error
            if isinstance(e, sp1.SetStatus):
                per = {d: {"confirmed_certificate": h} for d, h in e.detail.get("confirmed", {}).items()}
                await asyncio.to_thread(self.devices.set, t.transfer_id, list(e.device_ids), e.status, per_device=per)
            elif isinstance(e, sp1.RevokeOld):
                await asyncio.to_thread(self._save, new)  # the confirmation's cti is spent first
                await revoker.revoke_operational(e.device_ids, reason=REVOCATION_REASON, actor="transfer")
                done = await asyncio.to_thread(self.devices.set, t.transfer_id, list(e.device_ids), st.REVOKED_AT_CA1)
        return done


# --- SP2 ------------------------------------------------------------------------------------------------
class Sp2Service(_Provider[sp2.Sp2Transfer]):
    """The provider taking the fleet over, on its own deployment (CA2 = its operational CA)."""

    def __init__(self, *, registrar: Registrar, **seams: Unpack[Seams]) -> None:
        super().__init__(SP2, sp2.Sp2Transfer.from_json, **seams)
        self.registrar = registrar

    def accept(
        self,
        token: bytes,
        *,
        peer_id: str,
        peer_certificate: x509.Certificate,
        reset_not_before: dt.datetime,
        reset_not_after: dt.datetime,
        fallback_uri: str,
        ra_uri: str | None = None,
        update_uri: str = "",
        update_first: bool = False,
        trust_anchors: Sequence[x509.Certificate] = (),
        dtype: str | None = None,
    ) -> tuple[str, bytes]:
        """SP1's UpdateInfoList -> register the x5bag with CA2 (get the CA-URI back) -> the
        TransferMessage for SP1 (VII-C). Returns (transfer id, TransferMessage)."""
        now = self.clock.now()
        try:
            state, _verified, effects = sp2.on_update_info(
                token, now, pinned=peer_certificate, provider_id=self.identity.provider_id, peer_id=peer_id
            )
            if self.tables.get_transfer(SP2, state.transfer_id) is not None:
                raise ConflictError(f"this UpdateInfoList was accepted before (transfer {state.transfer_id})")
        except RejectedError as exc:
            self.store.append_audit(
                [entry(now, fmt.REFUSED, "transfer", None, what="UpdateInfoList", **rejected_summary(exc))]
            )
            raise
        enroll_uri: str | None = None
        for e in effects:
            if isinstance(e, sp2.Register):
                reg = self.registrar.register(
                    e.x5bag, actor=f"transfer:{self.identity.provider_id}", batch=e.batch, windows=e.windows,
                    dtype=dtype,
                )  # fmt: skip
                enroll_uri = reg.enroll_uri
                state = sp2.registered(state, reg.enroll_uri)
            elif isinstance(e, sp2.Track):
                self.devices.add(
                    state.transfer_id,
                    {
                        d.device_id: {
                            "factory": d.fingerprint,
                            "reference": d.info.ra_reference.hex() if d.info.ra_reference else None,
                            "version": [d.info.version.seq, d.info.version.uri],
                        }
                        for d in e.devices
                    },
                )
        assert enroll_uri is not None
        claims = TransferClaims(
            reset_not_before=reset_not_before,
            reset_not_after=reset_not_after,
            ra_uri=ra_uri,
            update_uri=update_uri,
            update_first=update_first,
            enroll_uri=enroll_uri,
            fallback_uri=fallback_uri,
            trust_anchors=tuple(hashlib.sha256(cert_der(a)).digest() for a in trust_anchors),
        )
        state, tm = sp2.transfer_message(
            state, now, claims=claims, signer=self.identity.signer(with_chain=False), entropy=self.entropy
        )
        self._save(state)
        return state.transfer_id, tm

    def mark(self, tid: str, device_ids: Sequence[str], status: str, detail: Mapping[str, Any] | None = None) -> None:
        self.devices.set(tid, device_ids, status, detail=detail)

    def refresh_enrolled(self, tid: str) -> list[Enrolled]:
        """Devices CA2 has issued an operational certificate to since the transfer began."""
        t = self._load(tid)
        rows = self.devices.rows(tid)
        todo = [d for d, r in rows.items() if r.status not in (st.ENROLLED, st.REVOKED_AT_CA1)]
        held = self.tables.certificates_of(todo, profile="operational", issuer="operational")
        found: dict[str, dict[str, Any]] = {}
        for d, recs in held.items():
            fresh = [r for r in recs if r.created_at >= t.created_at]
            if fresh:
                newest = max(fresh, key=lambda r: r.created_at)
                found[d] = {"certificate": hashlib.sha256(newest.der).hexdigest(), "serial": format(newest.serial, "x")}
        self.devices.set(tid, list(found), st.ENROLLED, per_device=found)
        out = []
        for d, rec in self.devices.rows(tid).items():
            x = _detail(rec)
            if rec.status == st.ENROLLED and isinstance(x.get("certificate"), str):
                out.append(Enrolled(d, bytes.fromhex(x["certificate"])))
        return out

    def confirm(self, tid: str) -> bytes:
        """The confirmation for SP1 of the enrolled devices not confirmed before (one message)."""
        parts = self.confirm_parts(tid, max_bytes=MAX_CONFIRMATION_BYTES)
        if len(parts) != 1:  # only ids of hundreds of characters, by the hundred thousand
            raise RuntimeError(f"the confirmation needs {len(parts)} parts: use confirm_parts")
        return parts[0]

    def confirm_parts(self, tid: str, *, max_bytes: int, max_devices: int = MAX_DEVICES) -> list[bytes]:
        """The confirmation for SP1 of the enrolled devices not confirmed before, as signed
        confirmations of at most ``max_bytes`` and ``max_devices`` each (SP1's cm takes one NATS
        message at a time, and waits for km's revocations a bounded time: docs/adr/0019). Each has
        its own cti; SP1 takes them in any order."""
        t = self._load(tid)
        rows = self.devices.rows(tid)
        enrolled = [e for e in self.refresh_enrolled(tid) if not _detail(rows.get(e.device_id)).get("confirmed")]
        now, signer = self.clock.now(), self.identity.signer(with_chain=False)
        tokens: list[bytes] = []
        for batch in _batches(enrolled, max_bytes - _CONFIRMATION_OVERHEAD, min(max_devices, MAX_DEVICES)):
            token = sp2.confirmation(t, batch, now, signer=signer, entropy=self.entropy)
            if len(token) > max_bytes:  # the estimate is an upper bound: never taken
                raise ValueError(f"a confirmation part of {len(token)} bytes is over {max_bytes}")
            tokens.append(token)
        if not tokens:
            sp2.confirmation(t, [], now, signer=signer)  # ConflictError: nothing to confirm
        self.devices.set(tid, [e.device_id for e in enrolled], st.ENROLLED, detail={"confirmed": now.isoformat()})
        return tokens


class Sp2Verifier:
    """SP2's remote-attestation verifier (the raURI) for one transfer: nonce challenges, evidence
    judged against the references SP1 shared; records attested / failed-fallback."""

    def __init__(
        self,
        service: Sp2Service,
        tid: str,
        *,
        entropy: Entropy = secrets.token_bytes,
        ttl: dt.timedelta = attestation.DEFAULT_TTL,
    ) -> None:
        self.service = service
        self.tid = tid
        self.entropy = entropy
        self.ttl = ttl
        self._challenges: dict[str, attestation.Challenge] = {}
        self._references: dict[str, attestation.Reference] | None = None

    def challenge(self, device_id: str) -> bytes:
        nonce = self.entropy(16)
        self._challenges[device_id] = attestation.challenge(device_id, nonce, self.service.clock.now(), ttl=self.ttl)
        return nonce

    def _reference(self, device_id: str) -> attestation.Reference | None:
        """What SP1 shared for the device (read once per transfer: it does not change)."""
        if self._references is None:
            refs: dict[str, attestation.Reference] = {}
            for d, rec in self.service.devices.rows(self.tid).items():
                x = _detail(rec)
                if isinstance(x.get("reference"), str) and isinstance(x.get("factory"), str):
                    refs[d] = attestation.Reference(d, x["factory"], bytes.fromhex(x["reference"]))
            self._references = refs
        return self._references.get(device_id)

    def submit(self, evidence: bytes) -> attestation.Verdict:
        try:
            claimed = attestation.peek_evidence(evidence).device_id
        except RejectedError as exc:
            return attestation.Verdict("?", False, exc.message)
        reference = self._reference(claimed)
        state, verdict = attestation.verify(
            self._challenges.get(claimed), evidence, self.service.clock.now(), reference=reference
        )
        if state is None:
            self._challenges.pop(claimed, None)
        else:
            self._challenges[claimed] = state
        if reference is not None:
            status = st.ATTESTED if verdict.ok else st.FAILED_FALLBACK
            self.service.mark(self.tid, [claimed], status, {"attestation": verdict.reason})
        return verdict


@dataclass(frozen=True)
class UpdateImage:
    image: bytes
    info: Mapping[str, Any]


class StaticUpdateServer:
    """SP2's update server for one transfer (the updateURI), serving one image; records updated."""

    def __init__(self, service: Sp2Service, tid: str, image: UpdateImage) -> None:
        self.service = service
        self.tid = tid
        self.image = image

    def fetch(self, device_id: str) -> UpdateImage:
        rows = self.service.devices.rows(self.tid, [device_id])
        if device_id not in rows:
            raise NotFoundError(f"device {device_id} is not part of this transfer", device_id=device_id)
        self.service.mark(self.tid, [device_id], st.UPDATED, {"update": dict(self.image.info)})
        return self.image


#: a confirmation without its devices: CWT claims, COSE header, signature (P-384/RSA included), CBOR heads
_CONFIRMATION_OVERHEAD = 1024


def _batches(enrolled: Sequence[Enrolled], budget: int, most: int = MAX_DEVICES) -> list[list[Enrolled]]:
    """``enrolled`` cut into runs of at most ``most`` whose entries take at most ``budget`` bytes of
    CBOR each (an entry: the device id, a 32-byte hash, at most 13 bytes of array and string heads)."""
    out: list[list[Enrolled]] = []
    run: list[Enrolled] = []
    used = 0
    for e in enrolled:
        cost = len(e.device_id.encode()) + len(e.certificate_sha256) + 13
        if run and (used + cost > budget or len(run) >= most):
            out.append(run)
            run, used = [], 0
        run.append(e)
        used += cost
    if run:
        out.append(run)
    return out


def counts(rows: Mapping[str, TransferDeviceRecord]) -> dict[str, int]:
    out = dict.fromkeys(st.STATUSES, 0)
    for r in rows.values():
        out[r.status] = out.get(r.status, 0) + 1
    return out


def revoked_certificates(store: HeldCertificatesStore, device_ids: Sequence[str]) -> dict[str, list[CertRecord]]:
    """The revoked operational certificates of the devices (what CA1's VA reports as revoked)."""
    return store.certificates_of(device_ids, profile="operational", issuer="operational",
                                 statuses=("revoked",))  # fmt: skip


__all__ = [
    "REVOCATION_REASON",
    "SP1",
    "SP2",
    "Delivery",
    "KmRevoker",
    "LocalRevoker",
    "Receipt",
    "Registrar",
    "Revoker",
    "Sp1Service",
    "Sp2Service",
    "Sp2Verifier",
    "StaticUpdateServer",
    "UpdateImage",
    "counts",
    "revoked_certificates",
]
