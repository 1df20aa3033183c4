"""OCSP responses/s from km's validation authority over NATS: pre-signed (cached) answers and
answers signed on demand (with a nonce), 1 and 2 km workers, against the raw library rates.

Target: >= 10,000 responses/s from the cache over NATS on 2 cores.

Setup (real parts): a deployment (P-256, SQLite under the deployment), the embedded nats-server
on loopback, km as separate OS processes (``python -m iotdlm.cli.main km serve``). pm issues
``--certs`` operational certificates (``issue_batch`` of 100, device CSRs), the operator (the
``admin`` identity, ``KmClient.revoke``) revokes 10% of them (keyCompromise). The OCSP requests
are built with cryptography's ``OCSPRequestBuilder`` (SHA-1 CertID, RFC 5019): without a nonce
for the cache case; with a fresh 16-byte nonce in every request for the on-demand case (the
request is built once per certificate with a marker nonce, and each request sent carries
``os.urandom(16)`` in its place -- a valid DER request, checked before the run).

Load: ``--clients`` load-generator processes (multiprocessing, spawn), each with its own NATS
connection as the ``cm`` identity (which may publish to ``iotdlm.km.va.ocsp``) and ``--inflight``
concurrent requests; they start together and run for ``--duration`` seconds; a response counts
if it arrived before the deadline. Two client implementations: ``KmClient.ocsp`` (iotdlm's own
bus client, what cm uses) and bare ``nats-py`` ``request()`` (no iotdlm wrapper), to separate
what the client costs from what km and NATS cost on the same 2 cores. Each configuration runs
``--repeats`` times; medians and min/max are reported. Before measuring, the cache of every km
worker is warmed: passes over all certificates until every certificate has been answered by
every worker (seen as one distinct pre-signed response per worker).

Correctness: each client keeps the first response for a sample of certificates (good and
revoked); they are decoded with cryptography and checked: successful, the CertID asked, good or
revoked (time and reason) as recorded, signed by a delegated responder certificate issued by the
operational CA (signature verified), the nonce echoed in the on-demand case, thisUpdate <= now <
nextUpdate.

Also: the in-process ceiling (``Va.ocsp_cached`` and ``Va.ocsp`` with a nonce in a tight loop,
no bus), the latency with one request in flight, CPU per response of km, nats-server and the
clients, and (with py-spy) where a km worker's time goes under each kind of load.

Run: ``.venv/bin/python bench/va_ocsp.py [--quick] [--duration S] [--py-spy PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from common import (
    DTYPE,
    Baseline,
    BenchDeployment,
    Headline,
    Summary,
    bench_deployment,
    csr_der,
    device_keys,
    emit,
    find_pyspy,
    load_client_context,
    loadavg,
    log,
    md_table,
    measure_baseline,
    ms,
    parse_args,
    proc_cpu,
    rate,
)
from iotdlm.bus import subjects as s
from iotdlm.client.km import KmClient
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment
from iotdlm.errors import IotdlmError
from iotdlm.runtime import build_km, connect_identity, km_trust, open_store, sealer_for
from iotdlm.wire import km as msg

TARGET = 10_000.0
REVOKE_FRACTION = 0.10
REASON = "keyCompromise"
NONCE_LEN = 16
NONCE_MARKER = b"\xa5NONCE-MARKER-\x5a\xc3"  # 16 bytes, replaced per request
SAMPLES_PER_KIND = 40  # good and revoked certificates whose responses each client keeps
MODES = ("cache", "nonce")
KINDS = ("kmclient", "nats-py")
KIND_LABEL = {"kmclient": "`KmClient.ocsp` (iotdlm bus)", "nats-py": "bare nats-py `request()`"}
MODE_LABEL = {"cache": "cache (no nonce)", "nonce": "on demand (nonce)"}


# ------------------------------------------------------------------------------------ baselines


def _ocsp_fixture() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, x509.Certificate, x509.Certificate]:
    """A CA, a delegated responder certificate and a device certificate (P-256), for the baseline."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "baseline CA")])

    def cert(subject: str, key: ec.EllipticCurvePrivateKey, eku: bool) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, subject)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
        )
        if eku:
            b = b.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
            b = b.add_extension(x509.OCSPNoCheck(), critical=False)
        return b.sign(ca_key, hashes.SHA256())

    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
    )
    responder_key = ec.generate_private_key(ec.SECP256R1())
    responder = cert("baseline OCSP responder", responder_key, True)
    device = cert("dev-000001", ec.generate_private_key(ec.SECP256R1()), False)
    return responder_key, responder, device, ca_cert


def raw_ocsp_sign_rate(seconds: float, *, nonce: bool) -> float:
    """cryptography ``OCSPResponseBuilder.sign`` responses/s (one thread): the same response
    ``pki/ocsp.build_response`` makes (CertID by hash, responder id by key hash, the responder
    certificate included, the nonce echoed when asked), signed with P-256 and DER-encoded."""
    key, responder, device, ca_cert = _ocsp_fixture()
    req = ocsp.OCSPRequestBuilder().add_certificate(device, ca_cert, hashes.SHA1()).build()  # noqa: S303
    now = dt.datetime.now(dt.UTC)
    algo = hashes.SHA256()
    nonce_value = os.urandom(NONCE_LEN)

    def one() -> bytes:
        b = (
            ocsp.OCSPResponseBuilder()
            .add_response_by_hash(
                issuer_name_hash=req.issuer_name_hash,
                issuer_key_hash=req.issuer_key_hash,
                serial_number=req.serial_number,
                algorithm=hashes.SHA1(),  # noqa: S303
                cert_status=ocsp.OCSPCertStatus.GOOD,
                this_update=now,
                next_update=now + dt.timedelta(hours=1),
                revocation_time=None,
                revocation_reason=None,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, responder)
            .certificates([responder])
        )
        if nonce:
            b = b.add_extension(x509.OCSPNonce(nonce_value), critical=False)
        return b.sign(key, algo).public_bytes(serialization.Encoding.DER)

    n = 0
    start = time.perf_counter()
    while True:
        for _ in range(20):
            one()
        n += 20
        t = time.perf_counter()
        if t - start >= seconds:
            return n / (t - start)


@dataclass(frozen=True)
class OcspBaseline:
    sign: Summary  # ECDSA P-256 signatures/s (from common's Baseline, repeated here for the table)
    response: Summary  # OCSPResponseBuilder.sign responses/s, with a nonce


def measure_ocsp_baseline(quick: bool) -> OcspBaseline:
    repeats, seconds = (1, 0.15) if quick else (3, 0.5)
    from common import raw_sign_rate

    return OcspBaseline(
        sign=Summary.of([raw_sign_rate(seconds) for _ in range(repeats)]),
        response=Summary.of([raw_ocsp_sign_rate(seconds, nonce=True) for _ in range(repeats)]),
    )


# ------------------------------------------------------------------------------------ setup


@dataclass(frozen=True)
class CertInfo:
    serial: int
    revoked: bool
    revoked_at: dt.datetime | None


@dataclass
class Setup:
    certs: list[CertInfo]
    plain: list[bytes]  # OCSP request DER without nonce, one per certificate
    templates: list[tuple[bytes, int]]  # (request DER with the marker nonce, offset of the marker)
    ca_der: bytes  # the operational CA certificate
    issue_seconds: float = 0.0
    revoke_seconds: float = 0.0
    request_bytes: int = 0
    nonce_request_bytes: int = 0


async def module_client(bd: BenchDeployment, name: str, *, wait: float = 30.0) -> KmClient:
    """A NATS connection as module identity ``name`` (admin, cm, ...) and a KmClient signing as it."""
    bus, ident = await connect_identity(bd.dep, name)
    bd.buses.append(bus)
    return KmClient(bus, sealer_for(ident), bd.clock, timeout=wait, trust=km_trust(bd.dep))


def _nonce_template(cert: x509.Certificate, ca: x509.Certificate) -> tuple[bytes, int]:
    der = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(cert, ca, hashes.SHA1())  # noqa: S303 -- RFC 5019 CertID
        .add_extension(x509.OCSPNonce(NONCE_MARKER), critical=False)
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    off = der.find(NONCE_MARKER)
    if off < 0 or der.find(NONCE_MARKER, off + 1) >= 0:
        raise RuntimeError("the nonce marker is not found exactly once in the request DER")
    return der, off


def with_nonce(template: tuple[bytes, int], nonce: bytes) -> bytes:
    der, off = template
    return der[:off] + nonce + der[off + NONCE_LEN :]


async def issue_and_revoke(bd: BenchDeployment, n: int) -> Setup:
    """pm issues ``n`` operational certificates in batches of 100; admin revokes 10% of them."""
    keys = device_keys(64)
    items = [
        msg.IssueItem(
            device_id=f"{DTYPE}-ocsp-{i:06d}", profile="operational", csr=csr_der(keys[i % 64], f"{DTYPE}-ocsp-{i:06d}")
        )
        for i in range(n)
    ]
    pm = await bd.pm_client()
    t0 = time.perf_counter()
    certs: list[x509.Certificate] = []
    for i in range(0, n, 100):
        for r in await pm.issue_batch(items[i : i + 100]):
            if r.certificate is None:
                raise IotdlmError(f"issuance failed for {r.device_id}: {r.error}")
            certs.append(x509.load_der_x509_certificate(r.certificate.certificate))
    issue_s = time.perf_counter() - t0
    await bd.close_bus(pm.bus)

    admin = await module_client(bd, "admin")
    step = round(1 / REVOKE_FRACTION)
    revoked: dict[int, dt.datetime] = {}
    t0 = time.perf_counter()
    for i in range(0, n, step):
        (info,) = await admin.revoke(serial=format(certs[i].serial_number, "x"), issuer="operational", reason=REASON)
        assert info.revoked_at is not None
        revoked[certs[i].serial_number] = dt.datetime.fromisoformat(info.revoked_at)
    revoke_s = time.perf_counter() - t0
    await bd.close_bus(admin.bus)

    ca = bd.dep.ca_certificate("operational")
    plain = [
        ocsp.OCSPRequestBuilder()
        .add_certificate(c, ca, hashes.SHA1())  # noqa: S303 -- RFC 5019 CertID
        .build()
        .public_bytes(serialization.Encoding.DER)
        for c in certs
    ]
    templates = [_nonce_template(c, ca) for c in certs]
    # a request with a substituted nonce is a valid request carrying that nonce
    probe = os.urandom(NONCE_LEN)
    parsed = ocsp.load_der_ocsp_request(with_nonce(templates[0], probe))
    if parsed.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce != probe:
        raise RuntimeError("nonce substitution does not give a request with that nonce")
    if parsed.serial_number != certs[0].serial_number:
        raise RuntimeError("nonce substitution broke the CertID")
    return Setup(
        certs=[CertInfo(c.serial_number, c.serial_number in revoked, revoked.get(c.serial_number)) for c in certs],
        plain=plain,
        templates=templates,
        ca_der=ca.public_bytes(serialization.Encoding.DER),
        issue_seconds=issue_s,
        revoke_seconds=revoke_s,
        request_bytes=len(plain[0]),
        nonce_request_bytes=len(templates[0][0]),
    )


async def warm(bd: BenchDeployment, setup: Setup, workers: int, *, max_passes: int = 40) -> tuple[int, float]:
    """Send every no-nonce request until each certificate has been answered by every worker's
    cache (a cached response is the same bytes every time, one per worker). Returns (passes, s)."""
    cm = await module_client(bd, "cm")
    seen: list[set[bytes]] = [set() for _ in setup.plain]
    sem = asyncio.Semaphore(64)
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        async with sem:
            seen[i].add(await cm.ocsp(setup.plain[i]))

    passes = 0
    while passes < max_passes:
        passes += 1
        before = sum(len(x) for x in seen)
        await asyncio.gather(*(one(i) for i in range(len(setup.plain))))
        after = sum(len(x) for x in seen)
        if min(len(x) for x in seen) >= workers and after == before:
            break
    await bd.close_bus(cm.bus)
    if max(len(x) for x in seen) > workers:
        most = max(len(x) for x in seen)
        log(f"ocsp: warning: a certificate got {most} distinct cached answers from {workers} worker(s)")
    return passes, time.perf_counter() - t0


# ------------------------------------------------------------------------------------ load generator


@dataclass(frozen=True)
class ClientConfig:
    root: str
    kind: str  # "kmclient" or "nats-py"
    mode: str  # "cache" or "nonce"
    inflight: int
    plain: list[bytes]
    templates: list[tuple[bytes, int]]
    sample_idx: frozenset[int]
    seed: int
    timeout: float = 30.0


@dataclass
class ClientResult:
    done: int = 0
    late: int = 0  # answered after the deadline (not counted)
    errors: int = 0
    first_error: str = ""
    latencies: list[float] = field(default_factory=list)
    cpu: float = 0.0
    samples: dict[int, tuple[bytes, bytes | None]] = field(default_factory=dict)  # idx -> (response, nonce)


def client_process(cfg: ClientConfig, conn: Connection) -> None:
    """Entry point of one load-generator process (multiprocessing, spawn)."""
    asyncio.run(_client(cfg, conn))


async def _client(cfg: ClientConfig, conn: Connection) -> None:
    import random

    dep = Deployment.load(cfg.root)
    closer: Any
    if cfg.kind == "kmclient":
        bus, ident = await connect_identity(dep, "cm")
        client = KmClient(bus, sealer_for(ident), SystemClock(), timeout=cfg.timeout)
        send = client.ocsp
        closer = bus.close
    else:
        import nats

        ident = dep.identity("cm")
        nc = await nats.connect(
            dep.nats_url,
            user=ident.nats.user,
            password=ident.nats.password,
            inbox_prefix=s.inbox_prefix("cm"),
            name="bench-ocsp-nats-py",
        )

        async def send(der: bytes) -> bytes:
            m = await nc.request(s.KM_OCSP, der, timeout=cfg.timeout)
            if m.headers:
                raise RuntimeError(f"error reply: {m.headers} {m.data[:200]!r}")
            return m.data

        closer = nc.close

    n = len(cfg.plain)
    order = list(range(n))
    random.Random(cfg.seed).shuffle(order)
    res = ClientResult()
    conn.send("ready")
    start_at, duration = conn.recv()
    await asyncio.sleep(max(0.0, start_at - time.time()))
    t_start = time.perf_counter()
    deadline = t_start + duration
    cpu0 = time.process_time()
    perf = time.perf_counter
    nonce_mode = cfg.mode == "nonce"
    urandom = os.urandom
    lat = res.latencies
    samples = res.samples
    want = cfg.sample_idx

    async def loop(k: int) -> None:
        i = k
        while perf() < deadline:
            idx = order[i % n]
            i += cfg.inflight
            nonce = None
            if nonce_mode:
                nonce = urandom(NONCE_LEN)
                der = with_nonce(cfg.templates[idx], nonce)
            else:
                der = cfg.plain[idx]
            t0 = perf()
            try:
                resp = await send(der)
            except Exception as exc:  # a benchmark counts and reports failures, it does not stop
                res.errors += 1
                res.first_error = res.first_error or f"{type(exc).__name__}: {exc}"
                continue
            t1 = perf()
            if t1 <= deadline:
                res.done += 1
                lat.append(t1 - t0)
            else:
                res.late += 1
            if idx in want and idx not in samples:
                samples[idx] = (resp, nonce)

    await asyncio.gather(*(loop(k) for k in range(cfg.inflight)))
    res.cpu = time.process_time() - cpu0
    with contextlib.suppress(Exception):
        await closer()
    # plain types only: the class of this process is __mp_main__.ClientResult, unknown to the parent
    conn.send(dataclasses.asdict(res))
    conn.close()


@dataclass
class LoadRun:
    workers: int
    mode: str
    kind: str
    clients: int
    inflight: int
    seconds: float
    done: int
    errors: int
    first_error: str
    latencies: list[float]
    km_cpu: float
    nats_cpu: float
    client_cpu: float
    load: str
    machine_cpu: float  # CPU seconds used by every process on the machine during the run

    @property
    def others(self) -> float:
        """Cores used by processes that are not part of this benchmark (other tenants), on average."""
        return max(0.0, self.machine_cpu - self.km_cpu - self.nats_cpu - self.client_cpu) / self.seconds

    samples: list[tuple[int, bytes, bytes | None]]

    @property
    def rate(self) -> float:
        return self.done / self.seconds


async def run_load(
    bd: BenchDeployment,
    setup: Setup,
    *,
    workers: int,
    mode: str,
    kind: str,
    clients: int,
    inflight: int,
    seconds: float,
    seed: int,
) -> LoadRun:
    ctx = load_client_context()
    good = [i for i, c in enumerate(setup.certs) if not c.revoked][:SAMPLES_PER_KIND]
    bad = [i for i, c in enumerate(setup.certs) if c.revoked][:SAMPLES_PER_KIND]
    procs = []
    conns = []
    for k in range(clients):
        parent, child = ctx.Pipe()
        cfg = ClientConfig(
            root=str(bd.dep.root),
            kind=kind,
            mode=mode,
            inflight=inflight,
            plain=setup.plain,
            templates=setup.templates,
            sample_idx=frozenset(good + bad),
            seed=seed * 100 + k,
        )
        p = ctx.Process(target=client_process, args=(cfg, child), daemon=True)
        p.start()
        child.close()
        procs.append(p)
        conns.append(parent)
    loop = asyncio.get_running_loop()
    for c in conns:
        got = await loop.run_in_executor(None, c.recv)
        if got != "ready":
            raise RuntimeError(f"load client said {got!r}")
    start_at = time.time() + 0.3
    for c in conns:
        c.send((start_at, seconds))
    assert bd.server.pid is not None
    await asyncio.sleep(max(0.0, start_at - time.time()))
    km0 = sum(proc_cpu(p) for p in bd.worker_pids())
    nats0 = proc_cpu(bd.server.pid)
    sys0 = system_cpu()
    load = loadavg()
    await asyncio.sleep(seconds)
    km1 = sum(proc_cpu(p) for p in bd.worker_pids())
    nats1 = proc_cpu(bd.server.pid)
    sys1 = system_cpu()
    results = [ClientResult(**(await loop.run_in_executor(None, c.recv))) for c in conns]
    for p in procs:
        await loop.run_in_executor(None, p.join, 30)
    lat: list[float] = []
    samples: list[tuple[int, bytes, bytes | None]] = []
    for r in results:
        lat += r.latencies
        samples += [(i, der, nonce) for i, (der, nonce) in r.samples.items()]
    errs = [r for r in results if r.errors]
    return LoadRun(
        workers=workers,
        mode=mode,
        kind=kind,
        clients=clients,
        inflight=inflight,
        seconds=seconds,
        done=sum(r.done for r in results),
        errors=sum(r.errors for r in results),
        first_error=errs[0].first_error if errs else "",
        latencies=lat,
        km_cpu=km1 - km0,
        nats_cpu=nats1 - nats0,
        client_cpu=sum(r.cpu for r in results),
        machine_cpu=sys1 - sys0,
        load=load,
        samples=samples,
    )


# ------------------------------------------------------------------------------------ verification


@dataclass
class Checked:
    ok: int = 0
    good: int = 0
    revoked: int = 0
    bad: list[str] = field(default_factory=list)
    responders: set[int] = field(default_factory=set)


def verify_samples(setup: Setup, samples: list[tuple[int, bytes, bytes | None]], checked: Checked) -> None:
    """Decode each sampled response and check it is the right, correctly signed answer."""
    ca = x509.load_der_x509_certificate(setup.ca_der)
    now = dt.datetime.now(dt.UTC)
    for idx, der, nonce in samples:
        info = setup.certs[idx]
        try:
            resp = ocsp.load_der_ocsp_response(der)
            if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
                raise ValueError(f"status {resp.response_status}")
            if resp.serial_number != info.serial:
                raise ValueError("answer for another serial")
            if resp.hash_algorithm.name != "sha1":
                raise ValueError(f"CertID hash {resp.hash_algorithm.name}")
            (responder,) = resp.certificates
            responder.verify_directly_issued_by(ca)
            eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            if x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
                raise ValueError("responder certificate lacks id-kp-OCSPSigning")
            pub = responder.public_key()
            assert isinstance(pub, ec.EllipticCurvePublicKey)
            assert resp.signature_hash_algorithm is not None
            pub.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(resp.signature_hash_algorithm))
            if not resp.this_update_utc <= now < (resp.next_update_utc or now):
                raise ValueError("outside thisUpdate..nextUpdate")
            if info.revoked:
                if resp.certificate_status != ocsp.OCSPCertStatus.REVOKED:
                    raise ValueError(f"revoked certificate answered {resp.certificate_status.name}")
                if resp.revocation_reason != x509.ReasonFlags.key_compromise:
                    raise ValueError(f"reason {resp.revocation_reason}")
                assert info.revoked_at is not None
                assert resp.revocation_time_utc is not None
                if abs((resp.revocation_time_utc - info.revoked_at).total_seconds()) > 1:
                    raise ValueError("revocation time differs from the store's")
                checked.revoked += 1
            else:
                if resp.certificate_status != ocsp.OCSPCertStatus.GOOD:
                    raise ValueError(f"good certificate answered {resp.certificate_status.name}")
                checked.good += 1
            echoed = None
            with contextlib.suppress(x509.ExtensionNotFound):
                echoed = resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
            if echoed != nonce:
                raise ValueError(f"nonce sent {nonce!r}, echoed {echoed!r}")
            checked.responders.add(responder.serial_number)
            checked.ok += 1
        except Exception as exc:  # report every bad answer
            checked.bad.append(f"serial {info.serial:x}: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------------ in-process ceiling


@dataclass(frozen=True)
class InProc:
    cached: Summary  # Va.ocsp_cached calls/s
    parse: Summary  # pki.ocsp.parse_request calls/s
    on_demand: Summary  # Va.ocsp with a nonce calls/s (store read + sign), one thread
    on_demand_cpu: float  # CPU us per response of the above (median run)
    threaded: Summary  # Va.ocsp with a nonce through asyncio.to_thread, 128 in flight (as KmService does)
    threaded_cpu: float  # CPU us per response, all threads of this process


def in_process(bd: BenchDeployment, setup: Setup, quick: bool) -> InProc:
    """km's VA in this process on the deployment's own store: no bus."""
    from iotdlm.pki import ocsp as pki_ocsp

    store = open_store(bd.dep, migrate=False)
    try:
        km = build_km(bd.dep, store, bd.clock, passphrase=bd.passphrase.encode())
        va = km.va
        assert va is not None
        for der in setup.plain:
            va.ocsp(der)  # fill this VA's cache (signs once per certificate)
        repeats, seconds = (1, 0.2) if quick else (5, 1.0)

        def timed(fn: Any, items: list[bytes]) -> tuple[float, float]:
            n = 0
            t0 = time.perf_counter()
            c0 = time.process_time()
            while True:
                for x in items:
                    fn(x)
                n += len(items)
                t = time.perf_counter()
                if t - t0 >= seconds:
                    return n / (t - t0), (time.process_time() - c0) / n * 1e6

        cached = [timed(va.ocsp_cached, setup.plain)[0] for _ in range(repeats)]
        if any(va.ocsp_cached(x) is None for x in setup.plain):
            raise RuntimeError("in-process VA cache is not warm")
        parse = [timed(pki_ocsp.parse_request, setup.plain)[0] for _ in range(repeats)]
        nonce_reqs = [with_nonce(t, os.urandom(NONCE_LEN)) for t in setup.templates]
        demand = [timed(va.ocsp, nonce_reqs[: max(50, len(nonce_reqs) // 4)]) for _ in range(repeats)]

        async def threaded() -> tuple[float, float]:
            sem = asyncio.Semaphore(128)
            n = max(200, int(2000 * seconds))

            async def one(der: bytes) -> None:
                async with sem:
                    await asyncio.to_thread(va.ocsp, der)

            t0 = time.perf_counter()
            c0 = time.process_time()
            await asyncio.gather(*(one(nonce_reqs[i % len(nonce_reqs)]) for i in range(n)))
            return n / (time.perf_counter() - t0), (time.process_time() - c0) / n * 1e6

        def run_threaded() -> tuple[float, float]:
            return asyncio.run(threaded())

        with concurrent.futures.ThreadPoolExecutor(1) as ex:  # a fresh event loop, away from the bench's
            thr = [ex.submit(run_threaded).result() for _ in range(repeats)]
    finally:
        store.close()
    return InProc(
        cached=Summary.of(cached),
        parse=Summary.of(parse),
        on_demand=Summary.of([d[0] for d in demand]),
        on_demand_cpu=statistics.median(d[1] for d in demand),
        threaded=Summary.of([x[0] for x in thr]),
        threaded_cpu=statistics.median(x[1] for x in thr),
    )


# ------------------------------------------------------------------------------------ profile (py-spy)

#: (category, substrings of a frame "function (file:line)"), first match wins
PROFILE_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("startup: imports", ("_find_and_load (",)),
    ("OCSP: sign the response (pki/ocsp.py build_response, cryptography)", ("build_response (",)),
    ("store.get_certificate: one read transaction (SQLAlchemy + SQLite)", ("get_certificate (",)),
    ("OCSP: parse the request (pki/ocsp.py parse_request)", ("parse_request (",)),
    ("Va: cache lookup, responder match, clock (km/va.py)", ("ocsp_cached (", "km/va.py:")),
    ("asyncio.to_thread: hand-off to a worker thread", ("to_thread (", "run_in_executor (", "_WorkItem.run (")),
    ("bus: reply publish (nats-py publish)", ("publish (nats/aio/client.py",)),
    ("bus: handler task (on_request, _answer, call_handler)", ("on_request (", "_answer (", "call_handler (")),
    ("nats-py: socket read + protocol parse", ("_read_loop (", "parse (nats/protocol/parser.py", "_process_msg (")),
    ("nats-py: flusher (socket write)", ("_flusher (",)),
    ("nats-py: subscription delivery (wait_for_msgs)", ("_wait_for_msgs (", "wait_for_msgs (")),
    ("asyncio event loop (scheduling, selector)", ("run_forever (", "_run_once (")),
]
PROFILE_RATE = 250
#: categories that are a thread waiting, not working (left out of the shares)
PROFILE_IDLE = (
    "idle: executor thread waiting for work or for the GIL (thread.py _worker)",
    "idle: event loop waiting for the socket (selector)",
)


def _categorize(frames: list[str]) -> str:
    leaf = frames[-1] if frames else ""
    if leaf.startswith("_worker (concurrent/futures/thread.py"):
        return PROFILE_IDLE[0]
    if leaf.startswith(("EpollSelector.select (", "select (selectors.py")):
        return PROFILE_IDLE[1]
    for name, keys in PROFILE_CATEGORIES:
        if any(k in f for f in frames for k in keys):
            return name
    return "other"


def _read_raw(path: Path) -> list[tuple[list[str], int]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        out.append((frames, int(count)))
    return out


def system_cpu() -> float:
    """CPU seconds used so far by the whole machine (all CPUs, every process), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Profile:
    mode: str
    rate: float
    seconds: float
    rows: list[tuple[str, int]]
    leaves: list[tuple[str, int]]
    total: int


async def profile_worker(
    bd: BenchDeployment,
    setup: Setup,
    py_spy: str,
    mode: str,
    kind: str,
    clients: int,
    inflight: int,
    seconds: float,
    keep: Path | None,
) -> Profile | str:
    """Attach ``py-spy record`` (on-CPU samples, all threads) to the one running km worker for the
    load window only (startup and cache warm-up are not in it). Returns the profile, or why not."""
    (pid,) = bd.worker_pids()
    out_dir = Path(tempfile.mkdtemp(prefix="iotdlm-va-pyspy-"))
    raw = out_dir / f"km-{mode}.txt"
    spy = await asyncio.create_subprocess_exec(
        py_spy,
        "record",
        "--pid",
        str(pid),
        "-f",
        "raw",
        "-o",
        str(raw),
        "-r",
        str(PROFILE_RATE),
        "--threads",
        "--nonblocking",
        "--duration",
        str(int(seconds + 3)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    with contextlib.suppress(TimeoutError):
        out, _ = await asyncio.wait_for(spy.communicate(), 0.5)
        shutil.rmtree(out_dir, ignore_errors=True)
        return (
            f"py-spy could not attach to the km worker (exit {spy.returncode}): {out.decode(errors='replace')[-300:]}"
        )
    run = await run_load(
        bd, setup, workers=1, mode=mode, kind=kind, clients=clients, inflight=inflight, seconds=seconds, seed=99
    )
    await spy.communicate()
    try:
        return analyze_profile(raw, mode, run.rate, seconds, keep)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def analyze_profile(raw: Path, mode: str, achieved: float, seconds: float, keep: Path | None) -> Profile | str:
    if not raw.exists():
        return "py-spy wrote no profile"
    cats: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for frames, count in _read_raw(raw):
        c = _categorize(frames)
        cats[c] += count
        if c not in PROFILE_IDLE and frames:
            leaves[frames[-1]] += count
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(raw, keep / raw.name)
    total = sum(v for k, v in cats.items() if k not in PROFILE_IDLE)
    rows = [(k, v) for k, v in cats.most_common() if k not in PROFILE_IDLE]
    rows += [(k, cats[k]) for k in PROFILE_IDLE if cats[k]]
    return Profile(mode, achieved, seconds, rows, leaves.most_common(12), total)


# ------------------------------------------------------------------------------------ main


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, help="seconds per measured run (default 10, --quick 1)")
    p.add_argument("--repeats", type=int, help="runs per configuration (default 3, --quick 1)")
    p.add_argument("--certs", type=int, help="operational certificates to issue (default 1000, --quick 200)")
    p.add_argument("--clients", type=int, default=2, help="load-generator processes (default 2)")
    p.add_argument("--inflight", type=int, default=64, help="requests in flight per client process (default 64)")
    p.add_argument("--workers", type=int, nargs="+", help="km worker counts (default: 1 2; --quick: 1)")
    p.add_argument(
        "--kinds", nargs="+", choices=KINDS, help="client implementations (default: both; --quick: kmclient)"
    )
    p.add_argument(
        "--py-spy", default=find_pyspy(), help="py-spy for the km worker profile (default: PATH, else the venv's)"
    )
    p.add_argument("--profile-seconds", type=float, default=8.0, help="seconds of load per profiled run")
    p.add_argument("--keep-raw", type=Path, help="keep py-spy's raw stacks in this folder")


async def run(args: argparse.Namespace) -> tuple[str, list[Headline]]:
    quick: bool = args.quick
    seconds = args.duration or (1.0 if quick else 10.0)
    repeats = args.repeats or (1 if quick else 3)
    n_certs = args.certs or (200 if quick else 1000)
    workers_list = args.workers or ([1] if quick else [1, 2])
    kinds = args.kinds or (["kmclient"] if quick else list(KINDS))
    t_all = time.perf_counter()
    log(f"ocsp: baselines (load {loadavg()})")
    base_start = measure_baseline(quick)
    ocsp_start = measure_ocsp_baseline(quick)
    runs: list[LoadRun] = []
    single: list[LoadRun] = []
    warms: dict[int, tuple[int, float]] = {}
    checked = {m: Checked() for m in MODES}
    profiles: list[Profile | str] = []
    async with bench_deployment(workers=1) as bd:
        log(f"ocsp: issuing {n_certs} operational certificates, revoking {REVOKE_FRACTION:.0%}")
        setup = await issue_and_revoke(bd, n_certs)
        log(f"ocsp: issued in {setup.issue_seconds:.1f} s, revoked in {setup.revoke_seconds:.1f} s")
        log("ocsp: in-process ceiling")
        inproc = in_process(bd, setup, quick)
        for workers in workers_list:
            await bd.set_workers(workers)
            warms[workers] = await warm(bd, setup, workers)
            log(f"ocsp: {workers} worker(s): caches warm after {warms[workers][0]} pass(es)")
            if workers == workers_list[0] and not quick:
                one = await run_load(
                    bd,
                    setup,
                    workers=workers,
                    mode="cache",
                    kind="kmclient",
                    clients=1,
                    inflight=1,
                    seconds=min(seconds, 3.0),
                    seed=7,
                )
                single.append(one)
                verify_samples(setup, one.samples, checked["cache"])
            for mode in MODES:
                for kind in kinds:
                    for rep in range(repeats):
                        log(f"ocsp: {workers} worker(s), {mode}, {kind}, run {rep + 1}/{repeats} (load {loadavg()})")
                        r = await run_load(
                            bd,
                            setup,
                            workers=workers,
                            mode=mode,
                            kind=kind,
                            clients=args.clients,
                            inflight=args.inflight,
                            seconds=seconds,
                            seed=rep,
                        )
                        log(f"ocsp: -> {r.rate:,.0f} responses/s, {r.errors} errors")
                        verify_samples(setup, r.samples, checked[mode])
                        runs.append(r)
        if args.py_spy:
            await bd.set_workers(1)
            await warm(bd, setup, 1)
            for mode in MODES:
                log(f"ocsp: profiling one km worker under {mode} load with py-spy")
                profiles.append(
                    await profile_worker(
                        bd,
                        setup,
                        args.py_spy,
                        mode,
                        "nats-py",
                        args.clients,
                        args.inflight,
                        2.0 if quick else args.profile_seconds,
                        args.keep_raw,
                    )
                )
    base_end = measure_baseline(quick)
    ocsp_end = measure_ocsp_baseline(quick)
    took = time.perf_counter() - t_all
    return render(
        args,
        seconds,
        repeats,
        setup,
        inproc,
        runs,
        single,
        warms,
        checked,
        profiles,
        base_start,
        base_end,
        ocsp_start,
        ocsp_end,
        took,
    )


def _group(runs: list[LoadRun]) -> dict[tuple[int, str, str], list[LoadRun]]:
    out: dict[tuple[int, str, str], list[LoadRun]] = {}
    for r in runs:
        out.setdefault((r.workers, r.mode, r.kind), []).append(r)
    return out


def _med(rs: list[LoadRun]) -> LoadRun:
    return sorted(rs, key=lambda r: r.rate)[len(rs) // 2]


def render(
    args: argparse.Namespace,
    seconds: float,
    repeats: int,
    setup: Setup,
    inproc: InProc,
    runs: list[LoadRun],
    single: list[LoadRun],
    warms: dict[int, tuple[int, float]],
    checked: dict[str, Checked],
    profiles: list[Profile | str],
    base_start: Baseline,
    base_end: Baseline,
    ocsp_start: OcspBaseline,
    ocsp_end: OcspBaseline,
    took: float,
) -> tuple[str, list[Headline]]:
    quick = args.quick
    groups = _group(runs)
    resp_base = statistics.median([ocsp_start.response.p50, ocsp_end.response.p50])
    rows = []
    for (workers, mode, kind), rs in groups.items():
        rates = [r.rate for r in rs]
        m = _med(rs)
        lat = Summary.of(m.latencies) if m.latencies else None
        per = 1e6 / max(m.done, 1)
        target = ("**met**" if statistics.median(rates) >= TARGET else "missed") if mode == "cache" else "-"
        rows.append(
            [
                workers,
                MODE_LABEL[mode],
                KIND_LABEL[kind],
                f"{m.clients} x {m.inflight}",
                len(rs),
                f"**{rate(statistics.median(rates))}**",
                rate(min(rates)),
                rate(max(rates)),
                ms(lat.p50) if lat else "-",
                ms(_p(m.latencies, 99)) if m.latencies else "-",
                f"{m.km_cpu * per:.0f}",
                f"{m.km_cpu / m.seconds:.2f}",
                f"{m.nats_cpu * per:.0f}",
                f"{m.client_cpu * per:.0f}",
                sum(r.errors for r in rs),
                f"{statistics.median(r.others for r in rs):.2f}",
                target,
            ]
        )
    table = md_table(
        [
            "km workers",
            "answers",
            "client",
            "procs x in flight",
            "runs",
            "responses/s median",
            "min",
            "max",
            "latency p50 ms",
            "p99 ms",
            "km CPU us/resp",
            "km cores busy",
            "nats CPU us/resp",
            "client CPU us/resp",
            "errors",
            "other tenants' cores",
            f"target >= {TARGET:,.0f}/s (cache)",
        ],
        rows,
    )
    single_rows = []
    for r in single:
        single_rows.append(
            [
                r.workers,
                MODE_LABEL[r.mode],
                KIND_LABEL[r.kind],
                f"{r.seconds:g}",
                f"{r.done:,}",
                rate(r.rate),
                ms(_p(r.latencies, 50)),
                ms(_p(r.latencies, 99)),
                ms(max(r.latencies)),
            ]
        )
    single_md = (
        [
            "One request in flight (1 client process, `KmClient.ocsp`, cache): the latency without queueing.",
            "",
            md_table(
                ["km workers", "answers", "client", "s", "responses", "responses/s", "p50 ms", "p99 ms", "max ms"],
                single_rows,
            ),
            "",
        ]
        if single_rows
        else []
    )
    inproc_table = md_table(
        ["in this process, no bus", "unit", "min", "median", "max"],
        [
            ["`Va.ocsp_cached` (parse + cache hit)", "responses/s", *_spread(inproc.cached)],
            ["`pki.ocsp.parse_request` alone", "requests/s", *_spread(inproc.parse)],
            [
                f"`Va.ocsp` with a nonce (store read + sign), same thread; {inproc.on_demand_cpu:.0f} us CPU each",
                "responses/s",
                *_spread(inproc.on_demand),
            ],
            [
                "`Va.ocsp` with a nonce through `asyncio.to_thread`, 128 in flight (as `KmService._ocsp`); "
                f"{inproc.threaded_cpu:.0f} us CPU each",
                "responses/s",
                *_spread(inproc.threaded),
            ],
        ],
    )
    base_rows = [
        *base_start.rows("start of run")[:1],
        ["start of run: `OCSPResponseBuilder.sign` + DER (with nonce)", "responses/s", *_spread(ocsp_start.response)],
        *base_end.rows("end of run")[:1],
        ["end of run: `OCSPResponseBuilder.sign` + DER (with nonce)", "responses/s", *_spread(ocsp_end.response)],
    ]
    base_table = md_table(["raw library baseline (one thread, this run)", "unit", "min", "median", "max"], base_rows)

    # headline figures
    def best(mode: str, workers: int, kind: str) -> float | None:
        rs = groups.get((workers, mode, kind))
        return statistics.median([r.rate for r in rs]) if rs else None

    wmax = max(r.workers for r in runs)
    cache_km = best("cache", wmax, "kmclient")
    cache_raw = best("cache", wmax, "nats-py")
    nonce_km = best("nonce", wmax, "kmclient")
    nonce_raw = best("nonce", wmax, "nats-py")
    notes = []
    if quick:
        notes.append("- **--quick run: a smoke test, not figures.**")
    total_checked = sum(c.ok for c in checked.values())
    bad = [b for c in checked.values() for b in c.bad]
    notes.append(
        f"- Correctness: {total_checked:,} sampled responses decoded and checked "
        f"({checked['cache'].good + checked['nonce'].good:,} good, "
        f"{checked['cache'].revoked + checked['nonce'].revoked:,} revoked with time and reason, every "
        "signature verified against a responder certificate issued by the operational CA, nonce echoed in "
        f"every on-demand answer); {len(bad)} wrong"
        + (f" -- first: {bad[0]}" if bad else "")
        + f". Distinct responder certificates seen: {len(checked['cache'].responders | checked['nonce'].responders)} "
        "(each km worker issues its own delegated responder certificate on first use)."
    )
    notes.append(
        f"- Setup: {len(setup.certs):,} operational certificates issued by pm in {setup.issue_seconds:.1f} s; "
        f"{sum(c.revoked for c in setup.certs)} revoked by admin through `KmClient.revoke` in "
        f"{setup.revoke_seconds:.1f} s (each revocation also regenerates the partition's delta CRL). "
        f"Requests: {setup.request_bytes} bytes without nonce, {setup.nonce_request_bytes} with. Cache warm-up "
        + ", ".join(f"{w} worker(s): {p} pass(es) in {t:.1f} s" for w, (p, t) in warms.items())
        + "."
    )
    notes.append(
        "- `km CPU`, `nats CPU`, `client CPU`: CPU microseconds per response of all km worker processes, of "
        "nats-server and of the load-generator processes; `km cores busy`: km CPU seconds per second. "
        "`other tenants' cores`: CPU used by every process on the machine (`/proc/stat`) minus those, per "
        "second -- other work on this shared 2-core machine during the run."
    )
    errs = [r for r in runs if r.errors]
    if errs:
        notes.append(f"- **Errors** in {len(errs)} run(s); first: {errs[0].first_error}")
    heads = []
    if cache_km is not None:
        heads.append(
            Headline(
                what=f"OCSP from the cache over NATS, {wmax} km worker(s), `KmClient.ocsp` load",
                paper="-",
                target=f">= {TARGET:,.0f}/s",
                measured=f"{rate(cache_km)} responses/s (in-process ceiling {rate(inproc.cached.p50)}/s)",
                verdict="**met**" if cache_km >= TARGET else "missed",
            )
        )
    if cache_raw is not None:
        heads.append(
            Headline(
                what=f"OCSP from the cache over NATS, {wmax} km worker(s), bare nats-py load",
                paper="-",
                target=f">= {TARGET:,.0f}/s",
                measured=f"{rate(cache_raw)} responses/s",
                verdict="**met**" if cache_raw >= TARGET else "missed",
            )
        )
    for val, kind in ((nonce_km, "kmclient"), (nonce_raw, "nats-py")):
        if val is not None:
            heads.append(
                Headline(
                    what=f"OCSP signed on demand (nonce) over NATS, {wmax} km worker(s), {KIND_LABEL[kind]}",
                    paper="-",
                    target="-",
                    measured=f"{rate(val)} responses/s (raw `OCSPResponseBuilder.sign` {rate(resp_base)}/s per thread)",
                    verdict="-",
                )
            )
    prof_md: list[str] = []
    for p in profiles:
        if isinstance(p, str):
            prof_md += ["", f"km worker profile not taken: {p}"]
            continue
        prof_md += [
            "",
            f"#### km worker profile: {MODE_LABEL[p.mode]}, 1 worker, on-CPU samples (py-spy)",
            "",
            f"{p.rate:,.0f} responses/s while profiled ({p.seconds:g} s; py-spy slows the worker, read shares, "
            "not rates). Rows are exclusive, first match from the top.",
            "",
            md_table(
                ["where (km worker, all threads)", "samples", "share"],
                [[k, v, f"{v / max(p.total, 1):.0%}"] for k, v in p.rows],
            ),
            "",
            "Innermost frames (self time):",
            "",
            md_table(["frame", "samples", "share"], [[f"`{f}`", v, f"{v / max(p.total, 1):.0%}"] for f, v in p.leaves]),
        ]
    section = "\n".join(
        [
            "## OCSP responses over NATS (km VA)",
            "",
            f"Target: >= {TARGET:,.0f} responses/s from the cache over NATS on 2 cores. {len(setup.certs):,} "
            f"operational certificates, {REVOKE_FRACTION:.0%} revoked; SHA-1 CertID requests; "
            f"{args.clients} load-generator process(es) x {args.inflight} requests in flight, each its own "
            f"NATS connection as `cm`; {seconds:g} s per run, {repeats} run(s) per configuration, caches warmed "
            "first. Latency is per request as the client sees it (with that many in flight, mostly queueing).",
            "",
            table,
            "",
            *single_md,
            inproc_table,
            "",
            base_table,
            "",
            *notes,
            *prof_md,
            "",
            f"_Whole run: {took:.0f} s._",
        ]
    )
    return section, heads


def _p(values: list[float], q: float) -> float:
    from common import percentile

    return percentile(values, q)


def _spread(x: Summary) -> list[str]:
    return [rate(x.min), rate(x.p50), rate(x.max)]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    section, heads = asyncio.run(run(args))
    emit(section, args, heads)


if __name__ == "__main__":
    main()
