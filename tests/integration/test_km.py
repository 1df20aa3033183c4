"""km over the bus: the paper's createCertificate (CSR and CRMF, raVerified from pm), RA refusals,
signed requests and replays. Every test runs on the in-memory bus and on a real nats-server, the
latter twice: with every request in a worker thread, and with single requests answered on km's
event loop as ``km serve`` does for a SQLite store (ADR 0032)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from iotdlm.bus import Bus
from iotdlm.bus import subjects as s
from iotdlm.bus.memory import MemoryHub
from iotdlm.client.km import KmClient
from iotdlm.clock import FixedClock
from iotdlm.errors import (
    BadRequestError,
    BadSignatureError,
    ConflictError,
    NotAuthorizedError,
    RejectedError,
    ReplayError,
    TooLargeError,
    UnsupportedError,
    UntrustedError,
)
from iotdlm.km import Km, KmService, KmSettings
from iotdlm.km import service as km_service
from iotdlm.pki import crmf
from iotdlm.pki.ca import PublicUrls
from iotdlm.pki.chain import verify_issued_by
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.pki.names import device_id_of, device_subject
from iotdlm.pki.profiles import DEFAULT_PROFILES
from iotdlm.store import Store
from iotdlm.wire import km as msg
from iotdlm.wire.envelope import Sealer
from tests.fixtures_nats import start_nats
from tests.helpers import NOW, ORG, Pki, make_csr, make_pki

PKI = make_pki()


@dataclasses.dataclass
class Env:
    pki: Pki
    store: Store
    clock: FixedClock
    km: Km
    buses: dict[str, Bus]
    service: KmService

    def client(self, identity: str, bus_module: str | None = None) -> KmClient:
        module = bus_module or identity.split("-")[0]
        ident = self.pki.identities.get(identity) or self.pki.module(*identity.split("-", 1))
        return KmClient(self.buses[module], ident.sealer, self.clock, trust=PKI.km_trust())

    def sealer(self, identity: str) -> Sealer:
        return self.pki.module(*identity.split("-", 1)).sealer

    async def request(self, module: str, subject: str, request: bytes) -> bytes:
        """A request made by hand (replayed, stale, garbage), km's signed reply checked as every
        client checks it: km's errors are raised as km's."""
        client = KmClient(self.buses[module], self.sealer("admin"), self.clock, trust=self.pki.km_trust())
        return await client._call(subject, request, timeout=10)


def make_km(store: Store, clock: FixedClock, **settings: object) -> Km:
    return Km(
        cas=PKI.cas,
        profiles=DEFAULT_PROFILES,
        store=store,
        clock=clock,
        settings=KmSettings(organization=ORG, urls=PublicUrls("http://127.0.0.1:8080"), **settings),  # type: ignore[arg-type]
    )


@pytest.fixture(
    params=[
        "memory",
        pytest.param("nats", marks=pytest.mark.nats),
        pytest.param("nats-on-loop", marks=pytest.mark.nats),
    ]
)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    clock = FixedClock(NOW)
    store = Store.open(f"sqlite:///{tmp_path / 'km.db'}")
    km = make_km(store, clock, max_request_bytes=64 * 1024)
    for ident in ("pm-boardA", "pm-boardB", "cm", "sm", "admin"):
        PKI.module(*ident.split("-", 1))
    modules = ("km", "pm", "cm", "sm", "admin")
    server = None
    if request.param == "memory":
        hub = MemoryHub()
        buses: dict[str, Bus] = {m: hub.bus(m) for m in modules}
    else:
        server = start_nats(tmp_path)
        buses = {m: await server.connect(m) for m in modules}
    service = KmService(km, buses["km"], identity=PKI.km_identity(), on_loop=request.param == "nats-on-loop")
    await service.start()
    try:
        yield Env(PKI, store, clock, km, buses, service)
    finally:
        await service.stop()
        for b in buses.values():
            await b.close()
        if server is not None:
            server.server.stop()
        store.close()


def _verify(cert_der: bytes, issuer: str, device_id: str) -> x509.Certificate:
    cert = x509.load_der_x509_certificate(cert_der)
    verify_issued_by(cert, PKI.cas[issuer].certificate, now=NOW)
    assert device_id_of(cert) == device_id
    return cert


def _nothing_stored(env: Env) -> None:
    assert env.store.count_certificates() == 0
    assert env.store.list_devices() == []


async def test_pkcs10_issuance(env: Env) -> None:
    key = generate_key(Algorithm.P256)
    out = await env.client("pm-boardA").issue("dev-1", "operational", csr=make_csr(key, "dev-1"))
    cert = _verify(out.certificate, "operational", "dev-1")
    assert cert.public_key().public_bytes(*_spki()) == key.public_key().public_bytes(*_spki())
    rec = env.store.get_certificate("operational", int(out.serial, 16))
    assert rec is not None
    assert rec.requested_by == "pm[boardA]"
    assert rec.status == "valid"
    dev = env.store.get_device("dev-1")
    assert dev is not None
    assert dev.dtype == "boardA"


async def test_single_requests_run_on_the_loop_only_when_asked(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """ADR 0032: with ``on_loop`` a single issuance (and its refusal) is answered on km's event loop
    thread, a batch still in a worker thread; without it, every request in a worker thread."""
    loop_thread = threading.get_ident()  # km's service runs on this test's loop
    where: dict[str, int] = {}

    def spy(name: str) -> None:
        real = getattr(env.km, name)

        def run(token: bytes) -> object:
            where[name] = threading.get_ident()
            return real(token)

        monkeypatch.setattr(env.km, name, run)

    spy("issue")
    spy("issue_batch")
    pm = env.client("pm-boardA")
    out = await pm.issue("dev-loop", "operational", csr=make_csr(generate_key(Algorithm.P256), "dev-loop"))
    _verify(out.certificate, "operational", "dev-loop")
    assert (where["issue"] == loop_thread) is env.service.on_loop
    csr = make_csr(generate_key(Algorithm.P256), "dev-b")
    (result,) = await pm.issue_batch([msg.IssueItem(device_id="dev-b", profile="operational", csr=csr)])
    assert result.certificate is not None
    assert where["issue_batch"] != loop_thread
    del where["issue"]
    pub = generate_key(Algorithm.P256).public_key()
    der = crmf.build_ra_verified(7, device_subject("dev-x", ORG, "boardA"), pub)
    with pytest.raises(NotAuthorizedError):  # a refusal, sealed by km where the request ran
        await env.client("admin").issue("dev-x", "factory", crmf=der)
    assert (where["issue"] == loop_thread) is env.service.on_loop
    assert env.store.count_certificates() == 2


async def test_a_slow_answer_on_the_loop_is_logged(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ADR 0032: while km answers on its loop it answers nothing else, so a slow answer (a write
    waiting for another process's lock) goes into km's log; in a worker thread it blocks no one."""
    monkeypatch.setattr(km_service, "SLOW_ON_LOOP_S", 0.0)  # every answer counts as slow here
    with caplog.at_level(logging.WARNING, logger=km_service.__name__):
        await env.client("pm-boardA").issue("dev-s", "operational", csr=make_csr(generate_key(Algorithm.P256), "dev-s"))
    slow = [r.getMessage() for r in caplog.records if "on its event loop" in r.getMessage()]
    if env.service.on_loop:
        assert len(slow) == 1
        assert s.KM_ISSUE in slow[0]
        assert "write lock" in slow[0]
    else:
        assert slow == []


def _spki() -> tuple[serialization.Encoding, serialization.PublicFormat]:
    return serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


async def test_crmf_signature_pop(env: Env) -> None:
    key = generate_key(Algorithm.P256)
    der = crmf.build_signed(1, device_subject("dev-2", ORG, "boardA"), key)
    out = await env.client("pm-boardA").issue("dev-2", "operational", crmf=der)
    _verify(out.certificate, "operational", "dev-2")


async def test_crmf_ra_verified_via_pm(env: Env) -> None:
    pub = generate_key(Algorithm.P256).public_key()
    der = crmf.build_ra_verified(7, device_subject("dev-3", ORG, "boardA"), pub)
    out = await env.client("pm-boardA").issue("dev-3", "factory", crmf=der)
    cert = _verify(out.certificate, "factory", "dev-3")
    assert out.profile == "factory"
    assert cert.not_valid_after_utc > NOW.replace(year=NOW.year + 5)


async def test_ra_verified_not_from_pm_is_refused(env: Env) -> None:
    pub = generate_key(Algorithm.P256).public_key()
    der = crmf.build_ra_verified(7, device_subject("dev-4", ORG, "boardA"), pub)
    with pytest.raises(NotAuthorizedError, match="raVerified"):
        await env.client("admin").issue("dev-4", "factory", crmf=der)
    _nothing_stored(env)


async def test_forged_signature_is_refused(env: Env) -> None:
    """An envelope carrying pm's certificate but signed by another key."""
    forged = Sealer(generate_key(Algorithm.P256), env.pki.module("pm", "boardA").cert)
    client = KmClient(env.buses["pm"], forged, env.clock, trust=PKI.km_trust())
    with pytest.raises(BadSignatureError):
        await client.issue("dev-5", "operational", csr=make_csr(generate_key(Algorithm.P256), "dev-5"))
    _nothing_stored(env)


async def test_wrong_module_signature_is_refused(env: Env) -> None:
    """sm signs the request (and it reaches km on a connection allowed to publish): the RA says no."""
    client = KmClient(env.buses["admin"], env.sealer("sm"), env.clock, trust=PKI.km_trust())
    with pytest.raises(NotAuthorizedError):
        await client.issue("dev-6", "operational", csr=make_csr(generate_key(Algorithm.P256), "dev-6"))
    _nothing_stored(env)


async def test_pm_of_other_dtype_is_refused(env: Env) -> None:
    csr = make_csr(generate_key(Algorithm.P256), "dev-7")
    await env.client("pm-boardA").issue("dev-7", "factory", csr=csr)
    with pytest.raises(NotAuthorizedError, match="boardA"):
        await env.client("pm-boardB").issue("dev-7", "operational", csr=csr)
    assert env.store.count_certificates() == 1


async def test_signer_from_foreign_ca_is_untrusted(env: Env) -> None:
    other = make_pki().module("pm", "boardA")
    client = KmClient(env.buses["pm"], other.sealer, env.clock, trust=PKI.km_trust())
    with pytest.raises(UntrustedError):
        await client.issue("dev-8", "operational", csr=make_csr(generate_key(Algorithm.P256), "dev-8"))
    _nothing_stored(env)


async def test_replayed_request_is_refused(env: Env) -> None:
    item = msg.IssueItem("dev-9", "operational", csr=make_csr(generate_key(Algorithm.P256), "dev-9"))
    token = env.sealer("pm-boardA").seal(msg.OP_ISSUE, item, aud="km", now=NOW)
    await env.request("pm", s.KM_ISSUE, token)
    with pytest.raises(ReplayError):
        await env.request("pm", s.KM_ISSUE, token)
    assert env.store.count_certificates() == 1


async def test_stale_request_is_refused(env: Env) -> None:
    item = msg.IssueItem("dev-10", "operational", csr=make_csr(generate_key(Algorithm.P256), "dev-10"))
    token = env.sealer("pm-boardA").seal(msg.OP_ISSUE, item, aud="km", now=NOW - KmSettings.window * 2)
    with pytest.raises(ReplayError):
        await env.request("pm", s.KM_ISSUE, token)
    _nothing_stored(env)


def _secp256k1_csr() -> bytes:
    k = ec.generate_private_key(ec.SECP256K1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "dev-x")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(k, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


BAD_ITEMS = [
    ("garbage-der", {"csr": b"\x30\x03\x02\x01"}, BadRequestError),
    ("truncated-pem", {"csr": b"-----BEGIN CERTIFICATE REQUEST-----\nMIIBIjAN\n"}, BadRequestError),
    ("unsupported-curve", {"csr": None, "k1": True}, UnsupportedError),
    ("unknown-profile", {"profile": "superuser"}, NotAuthorizedError),
    ("both-csr-and-crmf", {"crmf": b"\x30\x00"}, BadRequestError),
    ("neither", {"csr": None}, BadRequestError),
    ("bad-device-id", {"device_id": "../../etc/passwd"}, BadRequestError),
    ("cn-mismatch", {"cn": "someone-else"}, BadRequestError),
    ("garbage-crmf", {"csr": None, "crmf": b"\x01\x02\x03"}, BadRequestError),
]


@pytest.mark.parametrize(("name", "change", "error"), BAD_ITEMS, ids=[b[0] for b in BAD_ITEMS])
async def test_bad_input_gets_clear_error_and_nothing_stored(env: Env, name: str, change: dict, error: type) -> None:
    fields = {
        "device_id": change.get("device_id", "dev-x"),
        "profile": change.get("profile", "operational"),
        "csr": make_csr(generate_key(Algorithm.P256), change.get("cn", "dev-x")),
    }
    if "csr" in change:
        fields["csr"] = change["csr"]
    if change.get("k1"):
        fields["csr"] = _secp256k1_csr()
    if "crmf" in change:
        fields["crmf"] = change["crmf"]
    with pytest.raises(error) as info:
        await env.client("pm-boardA").issue(**fields)
    assert info.value.message  # says what is wrong
    _nothing_stored(env)


async def test_oversize_request_is_refused(env: Env) -> None:
    item = msg.IssueItem("dev-big", "operational", csr=b"0" * (80 * 1024))
    token = env.sealer("pm-boardA").seal(msg.OP_ISSUE, item, aud="km", now=NOW)
    with pytest.raises(TooLargeError):
        await env.request("pm", s.KM_ISSUE, token)
    _nothing_stored(env)


async def test_garbage_envelope_is_refused(env: Env) -> None:
    for junk in (b"", b"hello", b"a.b.c", b"\xff" * 100):
        with pytest.raises(RejectedError):
            await env.request("pm", s.KM_ISSUE, junk)
    _nothing_stored(env)


async def test_batch_with_one_bad_item(env: Env) -> None:
    items = [
        msg.IssueItem(f"line-{i}", "factory", csr=make_csr(generate_key(Algorithm.P256), f"line-{i}")) for i in range(5)
    ]
    items[2] = msg.IssueItem("line-2", "factory", csr=b"garbage")
    results = await env.client("pm-boardA").issue_batch(items)
    assert [r.device_id for r in results] == [f"line-{i}" for i in range(5)]
    assert results[2].certificate is None
    assert results[2].error is not None
    assert results[2].error.code == "bad_request"
    for i in (0, 1, 3, 4):
        cert = results[i].certificate
        assert cert is not None
        _verify(cert.certificate, "factory", f"line-{i}")
    assert env.store.count_certificates() == 4


async def test_device_renews_its_operational_certificate(env: Env) -> None:
    old_key = generate_key(Algorithm.P256)
    first = await env.client("pm-boardA").issue("dev-r", "operational", csr=make_csr(old_key, "dev-r"))
    old_cert = x509.load_der_x509_certificate(first.certificate)
    device = KmClient(
        env.buses["cm"], Sealer(old_key, old_cert), env.clock, trust=PKI.km_trust()
    )  # cm relays for devices
    new_key = generate_key(Algorithm.P256)
    renewed = await device.renew(make_csr(new_key, "dev-r"))
    _verify(renewed.certificate, "operational", "dev-r")
    old = env.store.get_certificate("operational", old_cert.serial_number)
    assert old is not None
    assert old.status == "superseded"
    assert old.superseded_by == int(renewed.serial, 16)
    # the superseded certificate cannot renew again
    with pytest.raises(NotAuthorizedError, match="superseded"):
        await device.renew(make_csr(generate_key(Algorithm.P256), "dev-r"))


async def test_factory_certificate_cannot_renew(env: Env) -> None:
    key = generate_key(Algorithm.P256)
    issued = await env.client("pm-boardA").issue("dev-f", "factory", csr=make_csr(key, "dev-f"))
    cert = x509.load_der_x509_certificate(issued.certificate)
    device = KmClient(env.buses["cm"], Sealer(key, cert), env.clock, trust=PKI.km_trust())
    with pytest.raises(UntrustedError):  # not issued by the operational CA: not a renewal credential
        await device.renew(make_csr(generate_key(Algorithm.P256), "dev-f"))


async def test_retired_device_gets_nothing(env: Env) -> None:
    await env.client("pm-boardA").issue("dev-old", "factory", csr=make_csr(generate_key(Algorithm.P256), "dev-old"))
    env.store.set_device_status("dev-old", "retired", now=NOW)
    with pytest.raises(ConflictError, match="decommissioned"):
        await env.client("pm-boardA").issue(
            "dev-old", "operational", csr=make_csr(generate_key(Algorithm.P256), "dev-old")
        )


async def test_chain_and_get(env: Env) -> None:
    out = await env.client("pm-boardA").issue(
        "dev-c", "operational", csr=make_csr(generate_key(Algorithm.P256), "dev-c")
    )
    chain = await env.client("pm-boardA").chain()
    assert x509.load_der_x509_certificate(chain.root) == PKI.root
    assert set(chain.chains) == {"factory", "operational", "service"}
    info = await env.client("admin").get(out.serial)
    assert info.status == "valid"
    assert info.device_id == "dev-c"


@pytest.mark.nats
async def test_two_km_workers_share_load_without_duplicate_serials(tmp_path: Path) -> None:
    """Two km workers (two processes' worth: own store connection, own bus) in one queue group."""
    clock = FixedClock(NOW)
    server = start_nats(tmp_path)
    url = f"sqlite:///{tmp_path / 'km.db'}"
    stores = [Store.open(url), Store.open(url)]
    served = [0, 0]
    services = []
    for i, st in enumerate(stores):
        core = make_km(st, clock)
        original = core.issue

        def counting(token: bytes, _i: int = i, _orig=original) -> msg.IssuedCertificate:
            served[_i] += 1
            return _orig(token)

        core.issue = counting  # type: ignore[method-assign]
        svc = KmService(core, await server.connect("km"), identity=PKI.km_identity())
        await svc.start()
        services.append(svc)
    pm_buses = [await server.connect("pm") for _ in range(4)]
    pm_ident = PKI.module("pm", "boardA")
    keys = [generate_key(Algorithm.P256) for _ in range(8)]

    async def line(n: int) -> list[str]:
        client = KmClient(pm_buses[n % 4], pm_ident.sealer, clock, trust=PKI.km_trust())
        out = []
        for j in range(40):
            dev = f"w{n}-{j}"
            r = await client.issue(dev, "operational", csr=make_csr(keys[j % 8], dev))
            out.append(r.serial)
        return out

    try:
        serials = [x for chunk in await asyncio.gather(*(line(n) for n in range(8))) for x in chunk]
        assert len(serials) == 320
        assert len(set(serials)) == 320
        assert stores[0].count_certificates() == 320
        assert served[0] > 0
        assert served[1] > 0
        assert sum(served) == 320
    finally:
        for svc in services:
            await svc.stop()
            await svc.bus.close()
        for b in pm_buses:
            await b.close()
        server.server.stop()
        for st in stores:
            st.close()


class _Mode:
    """Stand-in for iotdlm.modes.guard.ModeGuard (its own tests cover it): a fixed current mode."""

    def __init__(self, mode: str) -> None:
        self.current = mode

    def require(self, allowed_modes: set[str] | frozenset[str], what: str) -> str:
        from iotdlm.errors import ModeError

        if self.current not in allowed_modes:
            raise ModeError(f"{what} is not allowed in mode {self.current}")
        return self.current


async def test_km_refuses_what_the_mode_forbids(env: Env) -> None:
    """Defence in depth: pm gets device certificates only in provisioning-certificate, even if a
    km was started by hand in another mode; the operator is not mode-bound."""
    from iotdlm.errors import ModeError

    env.km.mode = _Mode("certificate-management")
    csr = make_csr(generate_key(Algorithm.P256), "dev-m")
    with pytest.raises(ModeError, match="certificate-management"):
        await env.client("pm-boardA").issue("dev-m", "operational", csr=csr)
    with pytest.raises(ModeError):
        await env.client("pm-boardA").issue_batch([msg.IssueItem("dev-m", "factory", csr=csr)])
    assert env.store.count_certificates() == 0
    await env.client("admin").issue("dev-m", "factory", csr=csr)  # the operator may
    env.km.mode = _Mode("provisioning-certificate")
    await env.client("pm-boardA").issue("dev-m", "operational", csr=csr)
    assert env.store.count_certificates() == 2
