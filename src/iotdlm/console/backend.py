"""What the console asks of the deployment, behind one seam (:class:`Backend`), so the pages can be
tested without a running deployment.

:class:`LiveBackend` is the console process's: it reads what the CLI's list and show commands read
(the store), and acts exactly as the CLI acts -- a revocation is a request signed with the admin
identity to km (:class:`~iotdlm.client.km.KmClient`, the CLI's client; km verifies and audits it),
a mode switch the supervisor's ``modes.set`` as ``iotdlm mode set`` sends it (the supervisor audits
it), an audit verification :func:`iotdlm.cli.audit.verify_log`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from iotdlm.bus import Bus, subjects
from iotdlm.cli.audit import verify_log
from iotdlm.cli.output import parse_serial
from iotdlm.client.km import KmClient
from iotdlm.clock import Clock
from iotdlm.deployment import Deployment
from iotdlm.errors import BadRequestError, IotdlmError, ModeError, RejectedError, UnavailableError, UntrustedError
from iotdlm.km import audit as km_audit
from iotdlm.pki.chain import verify_issued_by
from iotdlm.pki.keys import check_public_key, verify_bytes
from iotdlm.store import Store
from iotdlm.store.records import (
    AuditRecord,
    CertRecord,
    CrlRecord,
    DeviceRecord,
    ProvisioningRecord,
)
from iotdlm.store.transfer import TransferRecord
from iotdlm.wire import km as msg
from iotdlm.wire import modes as m
from iotdlm.wire import pm as wire_pm
from iotdlm.wire import software as sw

#: how far back a device page looks for the device's audit records
TRAIL_SCAN = 2000
#: provisioning records shown per status (failed, in progress) and device type
PAGE_RECORDS = 50
#: how long the Software page waits for sm (it verifies every held release again, images included)
SM_HELD_TIMEOUT = 60.0


@dataclass(frozen=True)
class FleetPage:
    certificates: list[CertRecord]
    total: int
    devices: dict[str, DeviceRecord]
    #: how the search was read ("device id", "serial", ...), for the page to say
    matched: str


@dataclass(frozen=True)
class DeviceView:
    device: DeviceRecord | None
    certificates: list[CertRecord]
    trail: list[AuditRecord]


@dataclass(frozen=True)
class VerifyView:
    report: km_audit.AuditReport
    outside: int
    unreadable: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CaView:
    name: str
    certificate: x509.Certificate
    crls: list[CrlRecord]


@dataclass(frozen=True)
class PmView:
    """One device type's provisioning: pm's alarm, its records per status, the ones to look at."""

    dtype: str
    alarm: wire_pm.Alarm | None
    counts: dict[str, int]
    records: list[ProvisioningRecord]


@dataclass(frozen=True)
class TransferView:
    role: str
    record: TransferRecord
    counts: dict[str, int]
    refused: int


@dataclass(frozen=True)
class SoftwareView:
    """What sm holds (``sm.software.held``), or why sm did not say."""

    held: sw.HeldResponse | None
    note: str | None = None


class Backend(Protocol):
    async def admin_revoked(self, fingerprint: str) -> bool: ...
    async def fleet(
        self, query: str, profile: str | None, status: str | None, limit: int, offset: int
    ) -> FleetPage: ...
    async def device(self, device_id: str) -> DeviceView: ...
    async def ocsp_status(self, cert: CertRecord) -> str: ...
    async def revoke(self, device_id: str, reason: str | None, *, decommission: bool) -> list[msg.CertificateInfo]: ...
    async def revoke_certificate(self, cert: CertRecord, reason: str | None) -> list[msg.CertificateInfo]: ...
    async def mode_status(self) -> m.StatusReply: ...
    async def switch_mode(self, mode: str, by: str) -> m.SetReply: ...
    async def audit_page(self, limit: int, offset: int) -> tuple[list[AuditRecord], int]: ...
    async def audit_verify(self) -> VerifyView: ...
    async def cas(self) -> list[CaView]: ...
    async def metrics(self) -> str: ...
    async def provisioning(self) -> list[PmView]: ...
    async def clear_alarm(self, dtype: str, operator: str) -> None: ...
    async def transfers(self) -> list[TransferView]: ...
    async def software(self) -> SoftwareView: ...


def _involves(rec: AuditRecord, device_id: str, serials: set[str]) -> bool:
    if rec.subject is not None and (rec.subject == device_id or rec.subject.partition(":")[2] in serials):
        return True
    data = rec.data_json
    return f'"{device_id}"' in data or any(f'"{s}"' in data for s in serials)


def verify_ocsp_answer(
    answer: ocsp.OCSPResponse, leaf: x509.Certificate, issuer: x509.Certificate, now: dt.datetime
) -> None:
    """Raise a RejectedError unless ``answer`` speaks of ``leaf`` and is signed by its ``issuer`` or
    by a responder certificate the issuer made for OCSP signing (RFC 6960 4.2.2.2), valid ``now``."""
    if answer.serial_number != leaf.serial_number:
        raise UntrustedError("the answer is about another certificate")
    signer = answer.certificates[0] if answer.certificates else issuer
    if signer != issuer:
        verify_issued_by(signer, issuer, now=now, eku=ExtendedKeyUsageOID.OCSP_SIGNING)
    verify_bytes(check_public_key(signer.public_key()), answer.signature, answer.tbs_response_bytes)


class LiveBackend:
    """The console process's backend: the deployment's store, and its bus as the admin identity."""

    def __init__(self, dep: Deployment, store: Store, bus: Bus, km: KmClient, clock: Clock) -> None:
        self.dep = dep
        self.store = store
        self.bus = bus
        self.km = km
        self.clock = clock

    async def admin_revoked(self, fingerprint: str) -> bool:
        rec = await asyncio.to_thread(self.store.get_by_fingerprint, fingerprint)
        return rec is not None and rec.status != "valid"

    async def fleet(self, query: str, profile: str | None, status: str | None, limit: int, offset: int) -> FleetPage:
        return await asyncio.to_thread(self._fleet, query.strip(), profile, status, limit, offset)

    def _fleet(self, query: str, profile: str | None, status: str | None, limit: int, offset: int) -> FleetPage:
        st = self.store
        matched = "all certificates"
        if query:
            by_device = st.list_certificates(
                device_id=query, profile=profile, status=status, limit=limit, offset=offset
            )
            if by_device:
                total = st.count_certificates(device_id=query, profile=profile, status=status)
                return FleetPage(by_device, total, st.get_devices([query]), "device id")
            try:
                serial = parse_serial(query)
            except BadRequestError:
                return FleetPage([], 0, {}, "device id (no such device, and not a serial)")
            found = [
                c for c in st.find_by_serial(serial)
                if (profile is None or c.profile == profile) and (status is None or c.status == status)
            ]  # fmt: skip
            ids = [c.device_id for c in found if c.device_id]
            return FleetPage(found, len(found), st.get_devices(ids), "serial")
        certs = st.list_certificates(profile=profile, status=status, limit=limit, offset=offset)
        total = st.count_certificates(profile=profile, status=status)
        ids = sorted({c.device_id for c in certs if c.device_id})
        return FleetPage(certs, total, st.get_devices(ids), matched)

    async def device(self, device_id: str) -> DeviceView:
        return await asyncio.to_thread(self._device, device_id)

    def _device(self, device_id: str) -> DeviceView:
        st = self.store
        certs = st.list_certificates(device_id=device_id, limit=200)
        serials = {format(c.serial, "x") for c in certs}
        recent = st.list_audit(limit=TRAIL_SCAN)
        trail = [r for r in recent if _involves(r, device_id, serials)]
        return DeviceView(st.get_device(device_id), certs, trail)

    async def ocsp_status(self, cert: CertRecord) -> str:
        """What km's VA says of ``cert`` (good, revoked, unknown), over the bus."""
        leaf = x509.load_der_x509_certificate(cert.der)
        issuer = self.dep.ca_certificate(cert.issuer)
        req = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA256()).build()
        der = await self.km.ocsp(req.public_bytes(serialization.Encoding.DER))
        try:
            answer = ocsp.load_der_ocsp_response(der)
        except ValueError:
            return "no answer (not an OCSP response)"
        if answer.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
            return f"no answer ({answer.response_status.name.lower()})"
        try:
            verify_ocsp_answer(answer, leaf, issuer, self.clock.now())
        except RejectedError as exc:
            return f"not trusted: {exc.message}"
        return answer.certificate_status.name.lower()

    async def revoke(self, device_id: str, reason: str | None, *, decommission: bool) -> list[msg.CertificateInfo]:
        return await self.km.revoke(device_id=device_id, reason=reason, decommission=decommission)

    async def revoke_certificate(self, cert: CertRecord, reason: str | None) -> list[msg.CertificateInfo]:
        return await self.km.revoke(serial=format(cert.serial, "x"), issuer=cert.issuer, reason=reason)

    async def mode_status(self) -> m.StatusReply:
        return m.decode(await self.bus.request(subjects.MODES_STATUS, b"", timeout=5.0), m.StatusReply)

    async def switch_mode(self, mode: str, by: str) -> m.SetReply:
        req = m.SetRequest(mode=mode, with_sm=None, by=by)
        return m.decode(await self.bus.request(subjects.MODES_SET, m.encode(req), timeout=300.0), m.SetReply)

    async def audit_page(self, limit: int, offset: int) -> tuple[list[AuditRecord], int]:
        def page() -> tuple[list[AuditRecord], int]:
            return self.store.list_audit(limit=limit, offset=offset), self.store.count_audit()

        return await asyncio.to_thread(page)

    async def audit_verify(self) -> VerifyView:
        from iotdlm.runtime import audit_stream_heads

        anchors: list[km_audit.Anchored] = []
        unreadable: list[str] = []
        if self.dep.audit_anchor_dir is not None:
            anchors, unreadable = await asyncio.to_thread(km_audit.read_anchor_dir, self.dep.audit_anchor_dir)
        try:
            streamed, bad = await audit_stream_heads(self.dep)
        except IotdlmError as exc:
            streamed, bad = [], [f"the append-only NATS stream was not read ({exc.message})"]
        anchors += streamed
        report = await asyncio.to_thread(verify_log, self.dep, anchors)
        return VerifyView(report, len(anchors), unreadable + bad)

    async def cas(self) -> list[CaView]:
        def read() -> list[CaView]:
            crls = self.store.list_crls()
            return [
                CaView(name, self.dep.ca_certificate(name), [c for c in crls if c.issuer == name])
                for name in ("root", "factory", "operational", "service")
            ]

        return await asyncio.to_thread(read)

    async def metrics(self) -> str:
        port = self.dep.config.metrics_port
        if port == 0:
            return "the supervisor's /metrics is turned off (metrics_port = 0 in iotdlm.toml)"
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
                http.get(f"http://127.0.0.1:{port}/metrics") as resp,
            ):
                return await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UnavailableError(f"the supervisor's /metrics on 127.0.0.1:{port} did not answer ({exc})") from exc

    async def provisioning(self) -> list[PmView]:
        from iotdlm.pm.alarm import read_alarm

        def read() -> list[PmView]:
            out = []
            for dtype in self.dep.config.dtypes:
                look = [
                    *self.store.list_provisioning(dtype=dtype, status="failed", limit=PAGE_RECORDS),
                    *self.store.list_provisioning(dtype=dtype, status="in-progress", limit=PAGE_RECORDS),
                ]
                counts = self.store.count_provisioning(dtype=dtype)
                out.append(PmView(dtype, read_alarm(self.store, dtype), counts, look))
            return out

        return await asyncio.to_thread(read)

    async def clear_alarm(self, dtype: str, operator: str) -> None:
        """As ``iotdlm pm clear-alarm`` does it (audited by pm's alarm code)."""
        from iotdlm.pm.alarm import clear_alarm

        if dtype not in self.dep.config.dtypes:
            raise BadRequestError(f"no device type {dtype!r} here", field="dtype")
        await asyncio.to_thread(clear_alarm, self.store, dtype, operator, self.clock.now())

    async def transfers(self) -> list[TransferView]:
        from iotdlm.transfer.shell import counts
        from iotdlm.transfer.status import last_refusal

        def read() -> list[TransferView]:
            out = []
            for role in ("sp1", "sp2"):
                for rec in self.store.list_transfers(role):
                    devs = self.store.get_transfer_devices(role, rec.transfer_id)
                    refused = sum(1 for d in devs.values() if last_refusal(d.detail))
                    out.append(TransferView(role, rec, counts(devs), refused))
            return out

        return await asyncio.to_thread(read)

    async def software(self) -> SoftwareView:
        """The releases sm holds, each verified again by sm; a note when sm does not answer (it runs in
        software-management and provisioning-software with sm only)."""
        try:
            raw = await self.bus.request(subjects.SM_SOFTWARE_HELD, b"{}", timeout=SM_HELD_TIMEOUT)
        except (UnavailableError, ModeError) as exc:
            return SoftwareView(None, f"sm did not answer ({exc.message.rstrip('.?')})")
        return SoftwareView(sw.decode(raw, sw.HeldResponse, what="sm's answer"))
