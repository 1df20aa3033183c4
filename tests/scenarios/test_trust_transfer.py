"""Seed 003, end to end: a fleet moves from SP1 (CA1) to SP2 (CA2).

Two deployments made by ``init_deployment``: SP1's (its root issues the factory CA -- the
permanent CA that issued the factory certificates, Fig. 1b -- and CA1, its operational CA) and
SP2's (CA2). A real km on each (KmService on an in-memory bus), SP2's cm serving EST over HTTPS on
a random loopback port (the devices re-enroll with CA2 through it, TLS client certificate = the
factory certificate), simulated devices provisioned by SP1 (factory certificate through pm's path,
operational certificate from CA1 by EST as cm relays it), SP2's attestation verifier and update
server in-process. Time comes from a clock at the real time (TLS checks validity with it).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from iotdlm.bus.memory import MemoryHub
from iotdlm.client.km import KmClient
from iotdlm.clock import SystemClock
from iotdlm.cm import CmConfig, CmService, Limits, server_tls_context
from iotdlm.cm_https import load_issued_pair
from iotdlm.deployment import Deployment, init_deployment
from iotdlm.device.est_client import EstClient
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.errors import NotAuthorizedError, RejectedError, ReplayError, UntrustedError
from iotdlm.km import Km, KmService
from iotdlm.km.registry import FactoryRegistry
from iotdlm.pki import est_proof
from iotdlm.pki.chain import certs_to_pem, der
from iotdlm.pki.keys import Algorithm, check_public_key, private_key_to_pem
from iotdlm.pki.names import device_id_of
from iotdlm.runtime import build_km, km_identity, km_trust, open_store, sealer_for
from iotdlm.store import Store
from iotdlm.transfer import messages as m
from iotdlm.transfer import sp2
from iotdlm.transfer import status as st
from iotdlm.transfer.agent import (
    DeviceAgent,
    DirectDelivery,
    EstEnroller,
    LocalAttestation,
    LocalFallback,
    LocalUpdates,
)
from iotdlm.transfer.attestation import measure
from iotdlm.transfer.identity import TransferIdentity, TransferSettings, create_identity
from iotdlm.transfer.shell import (
    LocalRevoker,
    Sp1Service,
    Sp2Service,
    Sp2Verifier,
    StaticUpdateServer,
    UpdateImage,
)
from iotdlm.wire import audit as fmt

PW = b"pw"
DTYPE = "sensor"
FIRMWARE = b"firmware v1 " * 100
SP1_ID = "urn:example:provider:sp1"
SP2_ID = "urn:example:provider:sp2"
SP1_UPDATE = "https://updates.sp1.example/fallback"


class Clock:
    """The real time, moved forward on demand (TLS checks validity with the real time)."""

    def __init__(self) -> None:
        self.offset = dt.timedelta()

    def now(self) -> dt.datetime:
        return SystemClock().now() + self.offset


@dataclasses.dataclass
class Provider:
    dep: Deployment
    store: Store
    km: Km
    km_service: KmService
    hub: MemoryHub
    identity: TransferIdentity
    clock: Clock

    def client(self, name: str) -> KmClient:
        bus = self.hub.bus(name.partition("-")[0])
        return KmClient(bus, sealer_for(self.dep.identity(name)), self.clock, trust=km_trust(self.dep))

    def ca(self, name: str) -> x509.Certificate:
        return self.dep.ca_certificate(name)


async def make_provider(root: Path, org: str, provider_id: str, clock: Clock) -> Provider:
    dep, cas = init_deployment(
        root, organization=org, algorithm=Algorithm.P256, dtypes=[DTYPE], passphrase=PW, now=clock.now()
    )
    store = open_store(dep)
    km = build_km(dep, store, clock, passphrase=PW)
    hub = MemoryHub()
    service = KmService(km, hub.bus("km"), identity=km_identity(dep))
    await service.start()
    service_ca = next(c for c in cas if c.name == "service")
    ident = create_identity(dep, TransferSettings(provider_id=provider_id), now=clock.now(), service_ca=service_ca)
    return Provider(dep, store, km, service, hub, ident, clock)


@dataclasses.dataclass
class World:
    tmp: Path
    clock: Clock
    sp1: Provider
    sp2: Provider
    sp1svc: Sp1Service
    sp2svc: Sp2Service
    registrar: FactoryRegistry
    cm2: CmService
    devices: dict[str, SimulatedDevice]
    old_operational: dict[str, x509.Certificate]
    verifiers: dict[str, Sp2Verifier] = dataclasses.field(default_factory=dict)
    updates: dict[str, StaticUpdateServer] = dataclasses.field(default_factory=dict)
    enroll_uri: str = ""

    @property
    def sp2_root(self) -> x509.Certificate:
        return self.sp2.ca("root")

    def agent(self, device_id: str, **kwargs: Any) -> DeviceAgent:
        defaults: dict[str, Any] = {
            "clock": self.clock,
            "retry_delay": 0.0,
            "enroller": EstEnroller(timeout=10.0),
            "fallback": LocalFallback({SP1_UPDATE: self.sp1svc}),
            "attestation_client": LocalAttestation(self.verifiers),
            "updates": LocalUpdates(self.updates),
        }
        defaults.update(kwargs)
        return DeviceAgent(self.devices[device_id], **defaults)

    def delivery(self, **kwargs: Any) -> DirectDelivery:
        return DirectDelivery({d: self.agent(d, **kwargs) for d in self.devices})

    async def provision(self, device_id: str) -> SimulatedDevice:
        """SP1 sets a device up: key made on the device, factory certificate (pm), truststore
        (SP1's root), firmware, and initial enrollment with CA1 (EST, as cm relays it)."""
        dev = SimulatedDevice.manufacture(self.tmp / "devices" / device_id, device_id, DTYPE)
        dev.generate_key()
        factory = await self.sp1.client(f"pm-{DTYPE}").issue(device_id, "factory", csr=dev.make_csr())
        fcert = x509.load_der_x509_certificate(factory.certificate)
        dev.write_certificate("factory", fcert)
        dev.write_truststore([self.sp1.ca("root"), *self.sp1.identity.chain])  # + SP1's transfer certificate (x5t)
        img = self.tmp / "fw.bin"
        img.write_bytes(FIRMWARE)
        dev.write_image("slot-a", img, {"version": "1"})
        dev.write_config(
            {"device_id": device_id, "dtype": DTYPE, "enroll_uri": "https://ca1.sp1.example/.well-known/est"}
        )
        dev.generate_pending_key()  # the operational key: made on the device, apart from the device key
        csr = dev.make_csr("pending")
        cm = self.sp1.client("cm")
        nonce = (await cm.est_nonce(der(fcert))).nonce
        out = await cm.est("simpleenroll", der(fcert), csr, proof=dev.est_proof("simpleenroll", nonce, csr))
        op = x509.load_der_x509_certificate(out.certificate.certificate)
        dev.install_operational(op)
        self.devices[device_id] = dev
        self.old_operational[device_id] = op
        return dev

    def export(self, device_ids: list[str], *, window: dt.timedelta = dt.timedelta(days=7)) -> tuple[str, bytes]:
        now = self.clock.now()
        return self.sp1svc.export(
            device_ids,
            peer_id=SP2_ID,
            peer_certificate=self.sp2.identity.certificate,
            not_before=now - dt.timedelta(minutes=1),
            not_after=now + window,
            version=lambda d: m.VersionInfo(1, f"https://sp1.example/suit/{DTYPE}/1"),
            references={d: measure(FIRMWARE) for d in device_ids},
        )

    def accept(self, uil: bytes, *, ra: bool = True, update_first: bool = True) -> tuple[str, bytes]:
        now = self.clock.now()
        tid_guess = m.transfer_id(m.sha256(uil))
        ra_uri = f"https://ra.sp2.example/{tid_guess}" if ra else None
        update_uri = f"https://updates.sp2.example/{tid_guess}"
        tid, tm = self.sp2svc.accept(
            uil,
            peer_id=SP1_ID,
            peer_certificate=self.sp1.identity.certificate,
            reset_not_before=now - dt.timedelta(minutes=1),
            reset_not_after=now + dt.timedelta(days=2),
            fallback_uri="https://sp2.example/unused",
            ra_uri=ra_uri,
            update_uri=update_uri,
            update_first=update_first,
            trust_anchors=[self.sp2_root],
        )
        assert tid == tid_guess
        if ra_uri:
            self.verifiers[ra_uri] = Sp2Verifier(self.sp2svc, tid)
        self.updates[update_uri] = StaticUpdateServer(self.sp2svc, tid, UpdateImage(b"firmware v2", {"version": "2"}))
        return tid, tm

    async def run_transfer(self, device_ids: list[str], **agent_kwargs: Any) -> tuple[str, dict[str, Any]]:
        _tid, uil = self.export(device_ids)
        tid, tm = self.accept(uil)
        self.sp1svc.accept(tm)
        msgs, skipped = self.sp1svc.device_messages(tid)
        assert not skipped
        receipts = await self.sp1svc.deliver(tid, msgs, self.delivery(**agent_kwargs))
        return tid, receipts

    def revoker(self) -> LocalRevoker:
        assert self.sp1.km.va is not None
        return LocalRevoker(self.sp1.store, self.sp1.km.va, self.clock)

    def ocsp_status(self, cert: x509.Certificate) -> ocsp.OCSPCertStatus:
        """CA1's VA, asked with a real OCSP request (with a nonce: a fresh answer)."""
        va = self.sp1.km.va
        assert va is not None
        req = (
            ocsp.OCSPRequestBuilder()
            .add_certificate(cert, self.sp1.ca("operational"), hashes.SHA256())
            .add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
            .build()
        )
        resp = ocsp.load_der_ocsp_response(va.ocsp(req.public_bytes(serialization.Encoding.DER)))
        assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
        return resp.certificate_status

    def crl_serials(self, cert: x509.Certificate) -> set[int]:
        """The serials a freshly made full CRL of the certificate's partition lists."""
        va = self.sp1.km.va
        assert va is not None
        rec = self.sp1.store.get_certificate("operational", cert.serial_number)
        assert rec is not None
        assert rec.crl_partition is not None
        crl = x509.load_der_x509_crl(va.generate_crl("operational", rec.crl_partition).der)
        assert crl.is_signature_valid(self.sp1.ca("operational").public_key())  # type: ignore[arg-type]
        return {r.serial_number for r in crl}


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    clock = Clock()
    sp1 = await make_provider(tmp_path / "sp1", "SP1", SP1_ID, clock)
    sp2 = await make_provider(tmp_path / "sp2", "SP2", SP2_ID, clock)
    # SP2's operator registers the permanent CA (SP1's root and factory CA) with CA2: which
    # external CA to trust is an operator's decision, taken once, out of band.
    registrar = FactoryRegistry(sp2.store, clock, enroll_uri="https://placeholder.invalid")
    registrar.register_cas([sp1.ca("root"), sp1.ca("factory")], actor="sp2-operator")
    https_chain, https_key = load_issued_pair(sp2.dep.root, now=clock.now())  # cm's HTTPS pair from init
    tls = server_tls_context(
        certificate_chain=https_chain,
        key_pem=private_key_to_pem(https_key, None),
        client_cas=[sp2.ca("root"), sp2.ca("factory"), sp2.ca("operational"), *registrar.client_cas()],
    )
    cm2 = CmService(
        CmConfig(https_port=0, http_port=None, limits=Limits(handshake_timeout=5.0)),
        km=sp2.client("cm"),
        tls=tls,
        ca_certificates=[sp2.ca("operational"), sp2.ca("root")],
        clock=clock,
    )
    await cm2.start()
    registrar.enroll_uri = f"https://127.0.0.1:{cm2.https_port}/.well-known/est"
    w = World(
        tmp=tmp_path,
        clock=clock,
        sp1=sp1,
        sp2=sp2,
        sp1svc=Sp1Service(store=sp1.store, identity=sp1.identity, clock=clock, fallback_uri=SP1_UPDATE),
        sp2svc=Sp2Service(store=sp2.store, identity=sp2.identity, clock=clock, registrar=registrar),
        registrar=registrar,
        cm2=cm2,
        devices={},
        old_operational={},
        enroll_uri=registrar.enroll_uri,
    )
    try:
        yield w
    finally:
        await cm2.stop()
        for p in (sp1, sp2):
            await p.km_service.stop()
            p.store.close()


async def provision(w: World, n: int, prefix: str = "dev") -> list[str]:
    ids = [f"{prefix}-{i:03d}" for i in range(n)]
    sem = asyncio.Semaphore(16)

    async def one(d: str) -> None:
        async with sem:
            await w.provision(d)

    await asyncio.gather(*(one(d) for d in ids))
    return ids


def refusals(store: Store) -> list[dict[str, Any]]:
    import json

    return [json.loads(r.data_json) for r in store.list_audit(kind=fmt.REFUSED, limit=1000)]


# --- the fleet ----------------------------------------------------------------------------------------------
@pytest.mark.real_clock
async def test_fleet_of_50_moves_to_ca2_and_ca1_revokes_the_old_certificates(world: World) -> None:
    w = world
    ids = await provision(w, 50)
    tid, receipts = await w.run_transfer(ids)
    assert {r.phase for r in receipts.values()} == {"committed"}, [r for r in receipts.values() if not r.accepted]

    ca2 = w.sp2.ca("operational")
    for d in ids:
        dev = w.devices[d]
        op = dev.certificate("operational")
        assert op is not None
        assert op.issuer == ca2.subject
        assert device_id_of(op) == d
        op.verify_directly_issued_by(ca2)
        trust = {c.subject for c in dev.truststore()}
        assert w.sp2_root.subject in trust
        assert w.sp1.ca("root").subject not in trust
        assert dev.config()["enroll_uri"] == w.enroll_uri
        assert dev.config()["dtype"] == DTYPE
        assert dev.image_info("slot-b") is not None  # the update from SP2 before enrolling

    sp2_counts = {r.status for r in w.sp2svc.status(tid).values()}
    assert sp2_counts == {st.UPDATED}  # attested, then updated; enrolled is read from CA2 below
    confirmation = w.sp2svc.confirm(tid)
    assert {r.status for r in w.sp2svc.status(tid).values()} == {st.ENROLLED}
    revoked = await w.sp1svc.revoke_old(confirmation, w.revoker())
    assert sorted(revoked) == ids
    assert {r.status for r in w.sp1svc.status(tid).values()} == {st.REVOKED_AT_CA1}

    delta_serials: set[int] = set()
    va = w.sp1.km.va
    assert va is not None
    partitions = set()
    for c in w.old_operational.values():
        rec = w.sp1.store.get_certificate("operational", c.serial_number)
        assert rec is not None
        assert rec.crl_partition is not None
        partitions.add(rec.crl_partition)
    for p in partitions:
        delta = x509.load_der_x509_crl(va.current_crl("operational", p, delta=True).der)
        delta_serials |= {r.serial_number for r in delta}
    for d in ids:
        old = w.old_operational[d]
        assert w.ocsp_status(old) == ocsp.OCSPCertStatus.REVOKED
        assert old.serial_number in w.crl_serials(old)
        assert old.serial_number in delta_serials
        rec = w.sp1.store.get_certificate("operational", old.serial_number)
        assert rec is not None
        assert rec.revocation_reason == "affiliationChanged"
        # the factory certificate (the permanent CA's) stays valid: it is the device's identity
        frec = w.sp1.store.list_certificates(device_id=d, profile="factory")[0]
        assert frec.status == "valid"


# --- fallbacks -------------------------------------------------------------------------------------------
@pytest.mark.real_clock
async def test_attestation_failure_falls_back_to_sp1_which_keeps_serving_the_device(world: World) -> None:
    w = world
    ids = await provision(w, 3)
    bad = ids[0]
    tampered = w.tmp / "tampered.bin"
    tampered.write_bytes(b"not the agreed firmware")
    w.devices[bad].write_image("slot-a", tampered, {"version": "1"})
    before_trust = [der(c) for c in w.devices[bad].truststore()]
    before_config = w.devices[bad].config()

    tid, receipts = await w.run_transfer(ids)
    assert receipts[bad].phase == "idle"
    assert "fallback" in receipts[bad].detail
    assert {receipts[d].phase for d in ids[1:]} == {"committed"}

    dev = w.devices[bad]
    assert [der(c) for c in dev.truststore()] == before_trust  # rolled back to the pre-transfer state
    assert dev.config() == before_config
    assert dev.certificate("operational") == w.old_operational[bad]
    events = [e["event"] for e in dev.events()]
    assert "transfer_failed" in events
    assert "transfer_rolled_back" in events
    assert "fallback_reported" in events
    assert w.sp1svc.status(tid)[bad].status == st.FAILED_FALLBACK
    assert w.sp2svc.status(tid)[bad].status == st.FAILED_FALLBACK

    confirmation = w.sp2svc.confirm(tid)
    revoked = await w.sp1svc.revoke_old(confirmation, w.revoker())
    assert bad not in revoked
    assert sorted(revoked) == sorted(ids[1:])
    assert w.ocsp_status(w.old_operational[bad]) == ocsp.OCSPCertStatus.GOOD
    # it keeps working under SP1: CA1 re-enrolls it with its (still valid) SP1 certificate
    cm, csr = w.sp1.client("cm"), dev.make_csr()
    nonce = (await cm.est_nonce(der(w.old_operational[bad]))).nonce
    proof = dev.est_proof("simplereenroll", nonce, csr)
    out = await cm.est("simplereenroll", der(w.old_operational[bad]), csr, proof=proof)
    assert out.certificate.issuer == "operational"
    assert out.certificate.device_id == bad


async def test_ca2_unreachable_falls_back(world: World) -> None:
    w = world
    ids = await provision(w, 2)
    w.registrar.enroll_uri = "https://127.0.0.1:9/.well-known/est"  # nothing listens there
    tid, receipts = await w.run_transfer(ids)
    for d in ids:
        assert receipts[d].phase == "idle", receipts[d]
        events = w.devices[d].events()
        assert sum(1 for e in events if e["event"] == "transfer_retry") == 2  # 3 attempts in all
        assert w.devices[d].certificate("operational") == w.old_operational[d]
        assert w.sp1svc.status(tid)[d].status == st.FAILED_FALLBACK
        assert w.ocsp_status(w.old_operational[d]) == ocsp.OCSPCertStatus.GOOD


@pytest.mark.real_clock
async def test_device_not_in_the_update_info_list_is_refused_by_ca2(world: World) -> None:
    w = world
    ids = await provision(w, 3)
    outsider = ids[2]
    await w.run_transfer(ids[:2])
    dev = w.devices[outsider]
    cert_pem, key_pem = dev.tls_identity("factory")
    # same permanent CA, valid factory certificate, real EST through CA2's cm: not registered
    async with EstClient(
        w.enroll_uri.removesuffix("/.well-known/est"),
        trust_anchor_pem=certs_to_pem([w.sp2_root]),
        client_cert_pem=cert_pem,
        client_key_pem=key_pem,
    ) as est:
        with pytest.raises(NotAuthorizedError, match="registered"):
            await est.simpleenroll(dev.make_csr())
    assert w.sp2.store.list_certificates(device_id=outsider) == []


# --- refusals -------------------------------------------------------------------------------------------
def state_claims(tm: bytes) -> m.TransferClaims:
    msg = m.cose.parse_sign1(tm, what="tm", max_bytes=1 << 20)
    return m.TransferMessage.from_payload(msg.payload, what="tm").claims


def _resign(token: bytes, change: Callable[[dict[int, Any]], None], signer: Any) -> bytes:
    msg = m.cose.parse_sign1(token, what="t", max_bytes=1 << 20)
    claims = cbor2.loads(msg.payload)
    change(claims)
    return signer.sign(m.cose.dumps(claims), typ=msg.typ)


async def test_transfer_messages_refused_and_audited_at_sp1(world: World) -> None:
    w = world
    ids = await provision(w, 1)
    _tid, uil = w.export(ids)
    tid, tm = w.accept(uil)
    tm_raw = m.cose.parse_sign1(tm, what="tm", max_bytes=1 << 20)
    altered = bytearray(tm)
    altered[len(altered) - len(tm_raw.signature) - 5] ^= 0x01  # a byte of the payload
    rogue = TransferIdentity(SP2_ID, w.sp1.identity.key, w.sp1.identity.chain)  # SP1's own key, not SP2's
    wrong_signer = _resign(tm, lambda c: None, rogue.signer(with_chain=False))
    cases = {"altered": bytes(altered), "wrong signer": wrong_signer}
    for name, token in cases.items():
        with pytest.raises(RejectedError):
            w.sp1svc.accept(token)
        assert any(r["what"] == "TransferMessage" for r in refusals(w.sp1.store)), name
    w.sp1svc.accept(tm)
    with pytest.raises(ReplayError, match="cti"):
        w.sp1svc.accept(tm)  # replayed
    # a second TransferMessage of SP2 for this transfer, valid for one hour, arriving later
    now = w.clock.now()
    state = w.sp2svc._load(tid)
    claims = dataclasses.replace(state_claims(tm), reset_not_after=now + dt.timedelta(hours=1))
    _s, short = sp2.transfer_message(state, now, claims=claims, signer=w.sp2.identity.signer(with_chain=False))
    w.clock.offset = dt.timedelta(hours=2)
    try:
        with pytest.raises(ReplayError, match="expired"):
            w.sp1svc.accept(short)
    finally:
        w.clock.offset = dt.timedelta()
    codes = [r["code"] for r in refusals(w.sp1.store)]
    assert codes.count("replay") >= 2
    assert "bad_signature" in codes or "untrusted" in codes
    assert w.sp1svc.status(tid)[ids[0]].status == st.PENDING


# --- FR1..FR4 ------------------------------------------------------------------------------------------------
@pytest.mark.real_clock
async def test_fr1_impersonation(world: World) -> None:
    """FR1 (impersonation security): nobody without the right keys passes. A device message signed
    by a key that does not chain to the device's truststore (SP2 posing as SP1 before the commit)
    is refused; a TransferMessage not signed by SP2's agreed certificate is refused at SP1; a device
    without a registered factory certificate cannot enroll with CA2; and a device keeping its old
    SP1 credential cannot use it after the transfer (CA1 revoked it: re-enrollment refused)."""
    w = world
    ids = await provision(w, 2)
    _tid, uil = w.export(ids[:1])
    tid, tm = w.accept(uil)
    w.sp1svc.accept(tm)
    msgs, _ = w.sp1svc.device_messages(tid)
    # SP2 forges SP1's per-device message with its own transfer identity
    forged = _resign(msgs[ids[0]], lambda c: None, w.sp2.identity.signer(with_chain=True))
    agent = w.agent(ids[0])
    receipt = await agent.handle(forged)
    assert not receipt.accepted
    assert "trusted root" in receipt.detail
    # a TransferMessage signed by anyone but SP2's agreed certificate
    with pytest.raises(UntrustedError):
        w.sp1svc.accept(_resign(tm, lambda c: None, w.sp1.identity.signer(with_chain=False)))
    # the genuine one goes through, then the old SP1 credential is dead
    receipt = await agent.handle(msgs[ids[0]])
    assert receipt.phase == "committed"
    await w.sp1svc.revoke_old(w.sp2svc.confirm(tid), w.revoker())
    with pytest.raises(NotAuthorizedError, match="revoked"):
        await w.sp1.client("cm").est("simplereenroll", der(w.old_operational[ids[0]]), w.devices[ids[0]].make_csr())
    # the device outside the UpdateInfoList: CA2's km refuses its factory certificate
    fcert = w.devices[ids[1]].certificate("factory")
    assert fcert is not None
    with pytest.raises(UntrustedError, match="registered"):
        await w.sp2.client("cm").est("simpleenroll", der(fcert), w.devices[ids[1]].make_csr())


@pytest.mark.real_clock
async def test_fr2_freshness_and_replay(world: World) -> None:
    """FR2 (freshness, replay): a captured per-device message is refused when replayed (its cti was
    seen, persisted on the device), when expired, and when sent to another device (aud); SP2's
    TransferMessage is refused when replayed at SP1. Each refusal is in the device log / SP1's
    audit log, and changes nothing on the device."""
    w = world
    ids = await provision(w, 2)
    _tid, uil = w.export(ids)
    tid, tm = w.accept(uil, ra=False, update_first=False)
    w.sp1svc.accept(tm)
    with pytest.raises(ReplayError):
        w.sp1svc.accept(tm)
    msgs, _ = w.sp1svc.device_messages(tid)
    a, b = ids
    # sent to the wrong device
    receipt = await w.agent(b).handle(msgs[a])
    assert not receipt.accepted
    assert "not this device" in receipt.detail
    # expired
    w.clock.offset = dt.timedelta(days=3)
    try:
        receipt = await w.agent(a).handle(msgs[a])
        assert not receipt.accepted
        assert "expired" in receipt.detail
    finally:
        w.clock.offset = dt.timedelta()
    # accepted once, refused when replayed -- even after the transfer (the cti is remembered)
    assert (await w.agent(a).handle(msgs[a])).phase == "committed"
    receipt = await w.agent(a).handle(msgs[a])
    assert not receipt.accepted
    refused = [e for e in w.devices[a].events() if e["event"] == "transfer_refused"]
    assert [e["code"] for e in refused][-1] in ("replay", "untrusted")
    assert any(e["code"] == "replay" and e.get("field") == "exp" for e in refused)


@pytest.mark.real_clock
async def test_fr3_forward_security(world: World) -> None:
    """FR3 (forward security): after the commit SP1's keys and certificates no longer get the
    device to do anything. A new transfer message properly signed by SP1's transfer identity is
    refused (SP1's root is gone from the truststore and SP1's signing key is retired); the old
    operational certificate is revoked at CA1 (OCSP and CRL); the device's new certificate is
    CA2's, for which SP1 holds nothing."""
    w = world
    ids = await provision(w, 1)
    d = ids[0]
    tid, receipts = await w.run_transfer(ids)
    assert receipts[d].phase == "committed"
    await w.sp1svc.revoke_old(w.sp2svc.confirm(tid), w.revoker())
    # SP1 tries again with a fresh, validly signed message (new cti, in the window)
    _tid2, uil2 = w.export(ids)
    tid2, tm2 = w.accept(uil2)
    w.sp1svc.accept(tm2)
    msgs, _ = w.sp1svc.device_messages(tid2)
    receipt = await w.agent(d).handle(msgs[d])
    assert not receipt.accepted
    assert "does not hold" in receipt.detail  # x5t: SP1's transfer certificate left with the truststore
    # and with the x5chain sent along: SP1's key is retired
    chained, _ = w.sp1svc.device_messages(tid2, with_chain=True)
    receipt = await w.agent(d).handle(chained[d])
    assert not receipt.accepted
    assert "former provider" in receipt.detail or "trusted root" in receipt.detail
    dev = w.devices[d]
    op = dev.certificate("operational")
    assert op is not None
    assert op.issuer == w.sp2.ca("operational").subject
    # seed 003 IX-C: "a new key-pair" -- CA2 certified a key made on the device for it, none of the
    # SP1 era (the factory certificate's, SP1's operational certificate's), now its operational key
    spki = est_proof.spki_sha256
    factory = dev.certificate("factory")
    assert factory is not None
    sp1_era = {spki(check_public_key(c.public_key())) for c in (factory, w.old_operational[d])}
    assert len(sp1_era) == 2  # SP1's operational key was apart from the factory key already
    assert spki(check_public_key(op.public_key())) not in sp1_era
    assert spki(dev.public_key("operational")) == spki(check_public_key(op.public_key()))
    assert not dev.has_key("pending")
    assert all(c.subject != w.sp1.ca("root").subject for c in dev.truststore())
    old = w.old_operational[d]
    assert w.ocsp_status(old) == ocsp.OCSPCertStatus.REVOKED
    assert old.serial_number in w.crl_serials(old)
    assert w.sp1.store.get_by_fingerprint(_fp(op)) is None  # SP1's CA never saw the new certificate


def _fp(cert: x509.Certificate) -> str:
    import hashlib

    return hashlib.sha256(der(cert)).hexdigest()


async def test_fr4_backward_security(world: World) -> None:
    """FR4 (backward security): what SP2 receives -- the UpdateInfoList and the x5bag it forwards
    to CA2 -- holds only the agreed fields: per device the factory certificate (public), the
    update window, the SUIT version info and the attestation reference; no private key, no
    operational certificate, no SP1 configuration."""
    w = world
    ids = await provision(w, 3)
    _tid, uil = w.export(ids)
    verified = m.open_update_info(uil, pinned=w.sp1.identity.certificate, audience=SP2_ID, now=w.clock.now())
    raw_payload = base64.urlsafe_b64decode(uil.split(b".")[1] + b"=" * (-len(uil.split(b".")[1]) % 4))
    payload = cbor2.loads(raw_payload)
    assert isinstance(payload, list)
    assert len(payload) == 4
    uil_list, bag, aud, _iat = payload
    assert aud == SP2_ID
    for entry, dev_id in zip(uil_list, ids, strict=True):
        assert len(entry) == 5  # TBS, not-before, not-after, versionInfo, raReference
        assert entry[0] == w.devices[dev_id].certificate("factory").tbs_certificate_bytes  # type: ignore[union-attr]
        assert entry[3] == [1, f"https://sp1.example/suit/{DTYPE}/1"]
    shared = {c.tbs_certificate_bytes for c in (x509.load_der_x509_certificate(b) for b in bag)}
    assert shared == {d.certificate.tbs_certificate_bytes for d in verified.devices}
    for dev_id in ids:
        dev = w.devices[dev_id]
        key = serialization.load_pem_private_key((dev.path / "secure" / "key.pem").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        scalar = key.private_numbers().private_value.to_bytes(32, "big")
        assert scalar not in raw_payload
        assert scalar not in uil
        assert der(w.old_operational[dev_id]) not in raw_payload  # no operational certificate either
    # the certificates SP2 forwards to CA2 are the factory certificates, nothing more
    w.accept(uil)
    registered = w.sp2.store.list_factory()
    assert {r.der for r in registered} == set(bag)
    for b in bag:
        cert = x509.load_der_x509_certificate(b)
        assert cert.issuer == w.sp1.ca("factory").subject
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value in ids
    # CA1's keys (and every other CA key of SP1) never leave SP1
    for ca in w.sp1.dep.load_cas(PW).values():
        ca_key = ca.signer.private_key  # type: ignore[attr-defined]
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        assert ca_key.private_numbers().private_value.to_bytes(32, "big") not in raw_payload
