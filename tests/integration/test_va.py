"""km's validation authority over the bus: revocation, OCSP (cached and on demand), partitioned
full and delta CRLs, decommissioning, and the audit log -- on the memory bus and on real NATS."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from iotdlm.bus import Bus
from iotdlm.bus.memory import MemoryHub
from iotdlm.client.km import KmClient
from iotdlm.clock import FixedClock
from iotdlm.errors import BadRequestError, ConflictError, NotAuthorizedError, NotFoundError
from iotdlm.km import Km, KmService, KmSettings
from iotdlm.km import audit as km_audit
from iotdlm.km.va import Va, VaSettings
from iotdlm.pki.ca import PublicUrls
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.pki.profiles import DEFAULT_PROFILES
from iotdlm.store import Store
from iotdlm.wire import audit as wire_audit
from iotdlm.wire.envelope import Sealer
from tests.fixtures_nats import start_nats
from tests.helpers import NOW, ORG, make_csr, make_pki

PKI = make_pki()
URLS = PublicUrls("http://127.0.0.1:8080", crl_partitions=4)


def make_km(store: Store, clock: FixedClock) -> Km:
    va = Va(cas=PKI.cas, profiles=DEFAULT_PROFILES, store=store, clock=clock, settings=VaSettings(urls=URLS))
    return Km(
        cas=PKI.cas,
        profiles=DEFAULT_PROFILES,
        store=store,
        clock=clock,
        settings=KmSettings(organization=ORG, urls=URLS),
        va=va,
    )


@dataclasses.dataclass
class Env:
    store: Store
    clock: FixedClock
    kms: list[Km]
    buses: dict[str, Bus]
    on_loop: bool = False

    def client(self, identity: str) -> KmClient:
        module = identity.split("-")[0]
        return KmClient(
            self.buses[module], PKI.module(*identity.split("-", 1)).sealer, self.clock, trust=PKI.km_trust()
        )

    async def issue(self, device_id: str, profile: str = "operational") -> x509.Certificate:
        out = await self.client("pm-boardA").issue(
            device_id, profile, csr=make_csr(generate_key(Algorithm.P256), device_id)
        )
        return x509.load_der_x509_certificate(out.certificate)


@pytest.fixture(
    params=[
        "memory",
        pytest.param("nats", marks=pytest.mark.nats),
        pytest.param("nats-on-loop", marks=pytest.mark.nats),
    ]
)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    """Two km workers (own store connection each) in one queue group; on a real nats-server also
    with single requests and OCSP signing on km's event loop, as ``km serve`` runs them (ADR 0032)."""
    clock = FixedClock(NOW)
    url = f"sqlite:///{tmp_path / 'km.db'}"
    stores = [Store.open(url), Store.open(url)]
    kms = [make_km(st, clock) for st in stores]
    server = None
    if request.param == "memory":
        hub = MemoryHub()
        km_buses = [hub.bus("km"), hub.bus("km")]
        buses: dict[str, Bus] = {m: hub.bus(m) for m in ("pm", "cm", "admin")}
    else:
        server = start_nats(tmp_path)
        km_buses = [await server.connect("km"), await server.connect("km")]
        buses = {m: await server.connect(m) for m in ("pm", "cm", "admin")}
    on_loop = request.param == "nats-on-loop"
    services = [
        KmService(k, b, identity=PKI.km_identity(), on_loop=on_loop) for k, b in zip(kms, km_buses, strict=True)
    ]
    for svc in services:
        await svc.start()
    try:
        yield Env(stores[0], clock, kms, buses, on_loop)
    finally:
        for svc in services:
            await svc.stop()
            await svc.bus.close()
        for b in buses.values():
            await b.close()
        if server is not None:
            server.server.stop()
        for st in stores:
            st.close()


def _ocsp_request(cert: x509.Certificate, *, nonce: bool, alg: hashes.HashAlgorithm | None = None) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, PKI.cas["operational"].certificate, alg or hashes.SHA1())  # noqa: S303
    if nonce:
        builder = builder.add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


async def _status(env: Env, cert: x509.Certificate, *, nonce: bool = False) -> ocsp.OCSPResponse:
    der = await env.client("cm").ocsp(_ocsp_request(cert, nonce=nonce))
    resp = ocsp.load_der_ocsp_response(der)
    assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    return resp


def _crl_serials(der: bytes) -> set[int]:
    return {r.serial_number for r in x509.load_der_x509_crl(der)}


async def test_revocation_shows_at_once_in_ocsp_and_next_crl(env: Env) -> None:
    cert = await env.issue("dev-1")
    # warm the cache of BOTH workers with "good" (requests spread over the queue group)
    for _ in range(8):
        assert (await _status(env, cert)).certificate_status == ocsp.OCSPCertStatus.GOOD
    part = cert.serial_number % URLS.crl_partitions
    before = await env.client("cm").crl("operational", part)
    assert cert.serial_number not in _crl_serials(before)

    revoked = await env.client("admin").revoke(serial=format(cert.serial_number, "x"), reason="keyCompromise")
    assert [r.serial for r in revoked] == [format(cert.serial_number, "x")]
    await asyncio.sleep(0.05)  # the revoked event reaches the other worker

    for _ in range(8):  # whichever worker answers, cached or not
        resp = await _status(env, cert)
        assert resp.certificate_status == ocsp.OCSPCertStatus.REVOKED
        assert resp.revocation_reason == x509.ReasonFlags.key_compromise
    env.clock.advance(dt.timedelta(days=2))  # the stored full CRL is past its next update
    after = await env.client("cm").crl("operational", part)
    assert cert.serial_number in _crl_serials(after)


async def test_ocsp_signed_on_demand_runs_on_the_loop_only_when_asked(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ADR 0032: with ``on_loop`` an answer signed on demand (a nonce) is signed on km's event loop
    thread, otherwise in a worker thread; either way it is the certificate's current status."""
    loop_thread = threading.get_ident()  # both km services run on this test's loop
    cert = await env.issue("dev-t")
    threads: list[int] = []
    for k in env.kms:
        assert k.va is not None
        real = k.va.answer

        def spy(query: object, real: object = real) -> bytes:
            threads.append(threading.get_ident())
            return real(query)  # type: ignore[operator,no-any-return]

        monkeypatch.setattr(k.va, "answer", spy)
    for _ in range(4):
        assert (await _status(env, cert, nonce=True)).certificate_status == ocsp.OCSPCertStatus.GOOD
    await env.client("admin").revoke(serial=format(cert.serial_number, "x"), reason="keyCompromise")
    assert (await _status(env, cert, nonce=True)).certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert len(threads) == 5
    assert all((t == loop_thread) is env.on_loop for t in threads)


async def test_nonce_is_echoed_and_unknown_serial_is_unknown(env: Env) -> None:
    cert = await env.issue("dev-2")
    req = _ocsp_request(cert, nonce=True)
    sent = ocsp.load_der_ocsp_request(req).extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    resp = ocsp.load_der_ocsp_response(await env.client("cm").ocsp(req))
    assert resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == sent
    stranger = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(12345)
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=1))
        .sign(generate_key(Algorithm.P256), hashes.SHA256())
    )
    assert (await _status(env, stranger)).certificate_status == ocsp.OCSPCertStatus.UNKNOWN


async def test_bad_ocsp_requests(env: Env) -> None:
    for junk in (b"", b"garbage", b"\x30\x03\x02\x01\x01"):
        resp = ocsp.load_der_ocsp_response(await env.client("cm").ocsp(junk))
        assert resp.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    foreign = make_pki()
    key = generate_key(Algorithm.P256)
    leaf = foreign.cas["operational"].issue(
        DEFAULT_PROFILES["operational"], key.public_key(), x509.Name([]), now=NOW, serial=7
    )
    req = (
        ocsp.OCSPRequestBuilder().add_certificate(leaf, foreign.cas["operational"].certificate, hashes.SHA256()).build()
    )
    resp = ocsp.load_der_ocsp_response(await env.client("cm").ocsp(req.public_bytes(serialization.Encoding.DER)))
    assert resp.response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED


async def test_delta_crl_lists_only_revocations_after_its_base(env: Env) -> None:
    certs = [await env.issue(f"dev-d{i}") for i in range(12)]
    by_part: dict[int, list[x509.Certificate]] = {}
    for c in certs:
        by_part.setdefault(c.serial_number % URLS.crl_partitions, []).append(c)
    part, group = max(by_part.items(), key=lambda kv: len(kv[1]))
    assert len(group) >= 2
    admin = env.client("admin")
    await admin.revoke(serial=format(group[0].serial_number, "x"), reason="superseded")
    env.clock.advance(dt.timedelta(minutes=10))
    va = env.kms[0].va
    assert va is not None
    base = va.generate_crl("operational", part)
    env.clock.advance(dt.timedelta(minutes=10))
    await admin.revoke(serial=format(group[1].serial_number, "x"), reason="keyCompromise")
    delta = x509.load_der_x509_crl(await env.client("cm").crl("operational", part, delta=True))
    assert {r.serial_number for r in delta} == {group[1].serial_number}
    assert delta.extensions.get_extension_for_class(x509.DeltaCRLIndicator).value.crl_number == base.number
    full = x509.load_der_x509_crl(base.der)
    assert {r.serial_number for r in full} == {group[0].serial_number}
    assert delta.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > base.number


async def test_concurrent_revocations_keep_crl_numbers_increasing(env: Env) -> None:
    certs = [await env.issue(f"dev-c{i}") for i in range(16)]
    admin = env.client("admin")
    await asyncio.gather(*(admin.revoke(serial=format(c.serial_number, "x")) for c in certs))
    numbers: dict[int, list[int]] = {}
    for part in range(URLS.crl_partitions):
        rec = env.store.get_crl("operational", part, "delta")
        full = env.store.get_crl("operational", part, "full")
        if rec is not None and full is not None:
            assert rec.number > full.number
            numbers[part] = [full.number, rec.number]
    assert numbers
    # a fresh CRL of every partition gets a number above everything issued before
    va = env.kms[1].va
    assert va is not None
    for part, seen in numbers.items():
        assert va.generate_crl("operational", part).number > max(seen)


async def test_double_revocation_and_bad_reason_change_nothing(env: Env) -> None:
    cert = await env.issue("dev-x")
    admin = env.client("admin")
    serial = format(cert.serial_number, "x")
    with pytest.raises(BadRequestError, match="reason"):
        await admin.revoke(serial=serial, reason="because")
    assert env.store.get_certificate("operational", cert.serial_number).status == "valid"  # type: ignore[union-attr]
    await admin.revoke(serial=serial, reason="keyCompromise")
    audit_count = env.store.count_audit()
    with pytest.raises(ConflictError, match="already revoked"):
        await admin.revoke(serial=serial, reason="superseded")
    rec = env.store.get_certificate("operational", cert.serial_number)
    assert rec is not None
    assert rec.revocation_reason == "keyCompromise"
    # the refusal itself is audited, nothing else (but the admin's first request at the other
    # worker, its "login", when the queue group sent it there)
    new = [r.kind for r in env.store.iter_audit(start_seq=audit_count + 1)]
    assert sorted(new) in (["refused"], ["login", "refused"])
    with pytest.raises(NotFoundError):
        await admin.revoke(serial="abcdef", reason="keyCompromise")


async def test_only_the_operator_may_revoke(env: Env) -> None:
    cert = await env.issue("dev-y")
    client = KmClient(
        env.buses["admin"], PKI.module("pm", "boardA").sealer, env.clock, trust=PKI.km_trust()
    )  # pm-signed
    with pytest.raises(NotAuthorizedError):
        await client.revoke(serial=format(cert.serial_number, "x"))
    assert env.store.get_certificate("operational", cert.serial_number).status == "valid"  # type: ignore[union-attr]


async def test_decommissioned_device_cannot_obtain_or_renew_anything(env: Env) -> None:
    key = generate_key(Algorithm.P256)
    first = await env.client("pm-boardA").issue("dev-eol", "operational", csr=make_csr(key, "dev-eol"))
    await env.issue("dev-eol", "factory")
    out = await env.client("admin").revoke(device_id="dev-eol", decommission=True)
    assert len(out) == 2
    assert {r.revocation_reason for r in out} == {"cessationOfOperation"}
    with pytest.raises(ConflictError, match="decommissioned"):
        await env.issue("dev-eol")
    old = x509.load_der_x509_certificate(first.certificate)
    device = KmClient(env.buses["cm"], Sealer(key, old), env.clock, trust=PKI.km_trust())
    with pytest.raises((ConflictError, NotAuthorizedError)):
        await device.renew(make_csr(generate_key(Algorithm.P256), "dev-eol"))
    assert env.store.get_device("dev-eol").status == "retired"  # type: ignore[union-attr]


async def test_audit_log_records_and_verifies(env: Env) -> None:
    cert = await env.issue("dev-a")
    await env.client("admin").revoke(serial=format(cert.serial_number, "x"), reason="keyCompromise")
    kinds = [r.kind for r in env.store.iter_audit()]
    assert [k for k in kinds if k in ("issuance", "revocation")] == ["issuance", "revocation"]
    assert kinds[0] == "login"  # pm's first request at this worker
    assert "crl" in kinds[kinds.index("revocation") :]  # the delta CRL made after the revocation
    km_key = PKI.module("km")
    assert km_audit.checkpoint(env.store, km_key.key, km_key.cert, NOW) is not None
    report = km_audit.verify(env.store, lambda fp: km_key.cert.public_key() if fp else None)
    assert report.ok, report.problems
    assert report.checkpoints == 1


async def test_cm_fetches_the_newest_signed_tree_head_from_km(env: Env) -> None:
    with pytest.raises(NotFoundError, match="no signed tree head yet"):
        await env.client("cm").audit_checkpoint()
    await env.issue("dev-a")
    km_key = PKI.module("km")
    cp = km_audit.checkpoint(env.store, km_key.key, km_key.cert, NOW)
    assert cp is not None
    th = wire_audit.decode_tree_head(await env.client("cm").audit_checkpoint())
    assert (th.size, th.root) == (cp.seq, cp.root)
    report = km_audit.verify(env.store, lambda fp: km_key.cert.public_key(), anchors=[km_audit.Anchored(th, "cm")])
    assert report.ok, report.problems


# --- tampering with the audit log in the database ------------------------------------------------


def _audit_db(tmp_path: Path) -> tuple[Store, str, object]:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    store = Store.open(url)
    for i in range(6):
        store.append_audit([km_audit.entry(NOW + dt.timedelta(seconds=i), "issuance", "pm[boardA]", f"s{i}", n=i)])
    ident = PKI.module("km")
    km_audit.checkpoint(store, ident.key, ident.cert, NOW)
    return store, str(tmp_path / "audit.db"), ident


def _verify(store: Store, ident: object) -> km_audit.AuditReport:
    cert = ident.cert  # type: ignore[attr-defined]
    return km_audit.verify(store, lambda fp: cert.public_key())


TAMPER = [
    ("edit", "UPDATE audit_log SET actor = 'someone-else' WHERE seq = 3", 3, "edited"),
    ("edit-data", "UPDATE audit_log SET data = '{\"n\":99}' WHERE seq = 4", 4, "edited"),
    ("delete", "DELETE FROM audit_log WHERE seq = 2", 2, "missing"),
    ("delete-last", "DELETE FROM audit_log WHERE seq = 6", 6, "no longer exists"),
    (
        "reorder",
        "UPDATE audit_log SET seq = CASE seq WHEN 4 THEN 5 WHEN 5 THEN 4 END WHERE seq IN (4, 5)",
        4,
        "",
    ),
]


@pytest.mark.parametrize(("name", "sql", "bad_seq", "words"), TAMPER, ids=[t[0] for t in TAMPER])
def test_audit_verify_names_the_tampered_record(tmp_path: Path, name: str, sql: str, bad_seq: int, words: str) -> None:
    store, path, ident = _audit_db(tmp_path)
    assert _verify(store, ident).ok
    with sqlite3.connect(path) as db:
        if name == "reorder":
            db.execute("UPDATE audit_log SET seq = -4 WHERE seq = 4")
            db.execute("UPDATE audit_log SET seq = 4 WHERE seq = 5")
            db.execute("UPDATE audit_log SET seq = 5 WHERE seq = -4")
        else:
            db.execute(sql)
    report = _verify(store, ident)
    assert not report.ok
    assert report.first_bad_seq == bad_seq, report.problems
    assert any(f"record {bad_seq}" in p and words in p for p in report.problems), report.problems
    store.close()
