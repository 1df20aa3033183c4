"""The best each of issue 15's ratios could be, from the work the design cannot skip (issue 15).

Every request that creates a certificate is signed by its sender and answered with a reply signed
by km (ADR 0006); the certificate is built from a CSR whose signature is checked, and recorded in
the store before the answer leaves. This script measures, in one run, the CPU time of each of those
unavoidable parts with the libraries iotdlm uses (cryptography, joserfc through
``iotdlm.wire.envelope``, nats-py against the embedded nats-server, the sqlite3 driver, aiohttp),
and from them the *ceiling* of each ratio: the figure the benchmark would show if everything else
(iotdlm's own Python, SQLAlchemy, asyncio scheduling, the audit chain, logging) cost nothing and the
machine's cores were all busy with the listed parts.

A ceiling below its target means the target cannot be met by making iotdlm's code faster: only by
doing less per request (dropping a signature or the record the design requires), or by another
language for those parts. A ceiling above its target says how much room is left for everything else.

What is counted per figure (CPU seconds, this run; ``cores`` is the machine's core count, all of it
given to the listed parts, which makes every ceiling generous: what 2 processes building certificates
side by side get done against one alone is measured and shown, not used):

- batch 1: pm's seal + km's JWS verify + CSR check + build+sign + km's reply seal + pm's reply
  verify + a NATS request/reply (client, responder and server CPU) + one issuance's rows (the
  request's nonce, the device, the certificate, its audit record) inside a shared SQLite
  transaction, written by bare sqlite3 into iotdlm's own schema (its tables and indexes, which the
  store's queries need). Ceiling = cores x build+sign / that sum.
- batch 100: CSR check + build+sign + the rows, plus a hundredth of the request's envelope work.
- EST through cm: per enrollment two HTTPS requests (the nonce, then simpleenroll) each costing at
  least an aiohttp hello over TLS, two bus requests (cm's seal, km's verify, km's reply seal,
  cm's reply verify, the round trip), the device's proof (one ECDSA sign by the client, one
  verify by km), the CSR check, build+sign and the rows. Ceiling = hello CPU / that sum (the
  yardstick is hello requests/s on the same machine).
- OCSP with a nonce: one hello (cm's HTTP), one NATS round trip (cm to km), the request's parse and
  the response's build+sign. Ceiling = cores x OCSP sign / that sum.
- OCSP GET through cm: a hello (the answer is cm's cached bytes). Ceiling 1.0x by definition.
- OCSP one at a time against ``openssl ocsp``: an aiohttp hello answered one at a time, by the same
  blocking-socket client ``cm_ocsp.py`` uses, against OpenSSL's responder started here.
- 1 certificate's wait: the issue's floor (NATS echo + CSR check + build+sign, wall p50) plus the
  request's and reply's seals and verifies and one SQLite write transaction; the lowest ratio
  possible (the target is an upper bound, <= 3x).
- sm: measured by ``sm_download.py`` beside sm's own runs (the disk's speed changes from minute to
  minute here): the disk alone, writing and fsyncing the image as sm does, against ``openssl dgst``.
- cfssl: measured by ``cfssl_peer.py`` (it runs cfssl), from this script's batch-1 parts.

Run: ``.venv/bin/python bench/floors.py [--quick]``. Nothing here asserts on time.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import multiprocessing as mp
import os
import shutil
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from common import (
    Headline,
    Summary,
    csr_der,
    emit,
    loadavg,
    log,
    md_table,
    parse_args,
    proc_cpu,
    raw_cert_builder,
)
from iotdlm.bus.server import EmbeddedNatsServer, NatsServerConfig, free_port
from iotdlm.wire import envelope

THIS = Path(__file__).resolve()
CORES = float(os.cpu_count() or 1)
AUDIT_DATA = '{"event":"issued"}' * 8  # about an audit record's size
NO_PASSWORD = serialization.NoEncryption()


# ------------------------------------------------------------------------------------ measuring


def cpu_each(fn: Callable[[], object], seconds: float) -> float:
    """CPU seconds of this thread per call of ``fn`` (called for about ``seconds`` of CPU)."""
    fn()
    n, start = 0, time.thread_time()
    while (spent := time.thread_time() - start) < seconds:
        for _ in range(20):
            fn()
        n += 20
    return spent / n


def wall_p50(fn: Callable[[], object], n: int) -> float:
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    return Summary.of(lat).p50


def _build_for(seconds: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    build = raw_cert_builder()
    build()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        build()
        n += 1
    out.put(n / (time.perf_counter() - t0))


def effective_cores(seconds: float) -> float:
    """Certificates/s of 2 processes building side by side over 1 alone (fork: same code, same state)."""
    ctx = mp.get_context("fork")

    def run(k: int) -> float:
        q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
        procs = [ctx.Process(target=_build_for, args=(seconds, q)) for _ in range(k)]
        for p in procs:
            p.start()
        rates = [q.get() for _ in procs]
        for p in procs:
            p.join()
        return sum(rates)

    one, two = run(1), run(2)
    return max(1.0, min(float(os.cpu_count() or 1), float(two / one)))


# ------------------------------------------------------------------------------------ the parts


def _self_signed(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


@dataclass
class Parts:
    """CPU seconds per operation (``echo_wall`` and the ``*_wall`` fields: p50 wall seconds)."""

    build_sign: float
    csr_check: float
    seal: float
    verify: float
    reply_seal: float
    reply_verify: float
    ecdsa_sign: float
    ecdsa_verify: float
    ocsp_parse: float
    ocsp_sign: float
    nats_rt: float
    sqlite_txn: float
    sqlite_row: float
    hello_tls: float
    cores: float
    scaling: float
    echo_wall: float
    csr_wall: float
    sign_wall: float


def crypto_parts(seconds: float) -> dict[str, float]:
    build = raw_cert_builder()
    device = ec.generate_private_key(ec.SECP256R1())
    der = csr_der(device, "dev-0000001")
    key, cert = _self_signed("pm-polarfire-soc")
    sealer = envelope.Sealer(key, cert)
    jk = envelope.jose_key(key.public_key())
    now = dt.datetime.now(dt.UTC)
    body = {"device_id": "dev-0000001", "profile": "factory", "csr": base64.b64encode(der).decode()}
    token = sealer.seal("issue", body, aud="km", now=now)
    answer = b'{"certificate":"' + base64.b64encode(build().public_bytes(serialization.Encoding.DER)) + b'"}'
    reply = sealer.seal_reply("iotdlm.km.issue", token, answer, error=False, now=now)
    data = os.urandom(300)
    sig = device.sign(data, ec.ECDSA(hashes.SHA256()))
    ca_key, ca = _self_signed("ca")
    leaf = build()
    req = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(leaf, ca, hashes.SHA1())  # noqa: S303 (the CertID hash RFC 6960 clients send)
        .add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
    )
    req_der = req.build().public_bytes(serialization.Encoding.DER)

    def check_csr() -> None:
        if not x509.load_der_x509_csr(der).is_signature_valid:
            raise SystemExit("the device CSR does not verify")

    def ocsp_sign() -> bytes:
        t = dt.datetime.now(dt.UTC)
        return (
            ocsp.OCSPResponseBuilder()
            .add_response(
                cert=leaf,
                issuer=ca,
                algorithm=hashes.SHA1(),  # noqa: S303
                cert_status=ocsp.OCSPCertStatus.GOOD,
                this_update=t,
                next_update=t + dt.timedelta(hours=1),
                revocation_time=None,
                revocation_reason=None,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, ca)
            .add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
            .sign(ca_key, hashes.SHA256())
            .public_bytes(serialization.Encoding.DER)
        )

    s = seconds
    return {
        "build_sign": cpu_each(build, s),
        "csr_check": cpu_each(check_csr, s),
        "seal": cpu_each(lambda: sealer.seal("issue", body, aud="km", now=now), s),
        "verify": cpu_each(lambda: envelope.verify(token, cert, jk, alg="ES256", op="issue", aud="km", now=now), s),
        "reply_seal": cpu_each(lambda: sealer.seal_reply("iotdlm.km.issue", token, answer, error=False, now=now), s),
        "reply_verify": cpu_each(
            lambda: envelope.verify_reply(reply, jk, alg="ES256", subject="iotdlm.km.issue", request=token, now=now), s
        ),
        "ecdsa_sign": cpu_each(lambda: device.sign(data, ec.ECDSA(hashes.SHA256())), s),
        "ecdsa_verify": cpu_each(lambda: device.public_key().verify(sig, data, ec.ECDSA(hashes.SHA256())), s),
        "ocsp_parse": cpu_each(lambda: ocsp.load_der_ocsp_request(req_der), s),
        "ocsp_sign": cpu_each(ocsp_sign, s),
        "csr_wall": wall_p50(check_csr, 200),
        "sign_wall": wall_p50(build, 200),
    }


def sqlite_parts(n: int) -> tuple[float, float]:
    """(CPU per write transaction of one issuance, CPU per issuance inside transactions of 100)
    with bare sqlite3 (WAL, synchronous=NORMAL, as the store opens SQLite) in iotdlm's own schema
    (the store's tables and indexes: the queries operators and the VA run need them): the request's
    nonce, the device (inserted if new), the certificate, and its audit record chained onto the
    log's head -- what the design writes per certificate, without iotdlm's Python around it."""
    from sqlalchemy import create_engine

    from iotdlm.store.tables import metadata

    with tempfile.TemporaryDirectory(prefix="iotdlm-floor-") as tmp:
        path = Path(tmp) / "floor.db"
        engine = create_engine(f"sqlite:///{path}")
        metadata.create_all(engine)
        engine.dispose()
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        der = os.urandom(600)
        at = "2026-12-05 10:00:00.000000"
        count = 0

        def rows(k: int) -> None:
            nonlocal count
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT INTO nonces (sender, nonce, expires_at) VALUES (?, ?, ?)",
                (os.urandom(32).hex(), os.urandom(16).hex(), at),
            )
            head = db.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
            seq = head[0] if head else 0
            for _ in range(k):
                count += 1
                seq += 1
                device = f"dev-{count:07d}"
                db.execute(
                    "INSERT INTO devices (device_id, dtype, status, created_at, updated_at) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (device_id) DO NOTHING",
                    (device, "polarfire-soc", "active", at, at),
                )
                db.execute(
                    "INSERT INTO certificates (serial_hex, issuer, subject, device_id, profile, not_before, "
                    "not_after, status, der, fingerprint, requested_by, created_at, crl_partition) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        os.urandom(20).hex(),
                        "factory",
                        f"CN={device},serialNumber={device},OU=polarfire-soc,O=Bench",
                        device,
                        "factory",
                        at,
                        "2027-03-05 10:00:00.000000",
                        "valid",
                        der,
                        os.urandom(32).hex(),
                        "pm-polarfire-soc",
                        at,
                        count % 64,
                    ),
                )
                db.execute(
                    "INSERT INTO audit_log (seq, at, kind, actor, subject, data, prev_hash, hash) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (seq, at, "issuance", "pm-polarfire-soc", device, AUDIT_DATA, "0" * 64, os.urandom(32).hex()),
                )
            db.execute("COMMIT")

        one = cpu_each(lambda: rows(1), n * 0.0004)
        batch = cpu_each(lambda: rows(100), n * 0.0004) / 100
        db.close()
        return one, batch


async def nats_parts(n: int) -> tuple[float, float]:
    """(CPU of a 512-byte request/reply round trip: requester, responder and nats-server; wall p50)."""
    import nats

    with (
        tempfile.TemporaryDirectory(prefix="iotdlm-floor-") as tmp,
        EmbeddedNatsServer(NatsServerConfig(port=free_port()), Path(tmp) / "nats.conf") as srv,
    ):
        a, b = await nats.connect(srv.url), await nats.connect(srv.url)
        try:

            async def echo(m: object) -> None:
                await m.respond(m.data)  # type: ignore[attr-defined]

            await b.subscribe("echo", cb=echo)
            await b.flush()
            # warm-up; a quick run (4 sections at once) once saw "no responders" on the first request
            # right after the flush: the responder is waited for, up to 5 s, before anything is timed
            deadline = time.monotonic() + 5
            for _ in range(50):
                while True:
                    try:
                        await a.request("echo", b"x" * 512, timeout=5)
                        break
                    except nats.errors.NoRespondersError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.01)
            pid = srv.pid
            assert pid is not None
            s0, c0 = proc_cpu(pid), time.process_time()
            lat = []
            for _ in range(n):
                t0 = time.perf_counter()
                await a.request("echo", b"x" * 512, timeout=5)
                lat.append(time.perf_counter() - t0)
            cpu = (time.process_time() - c0) + (proc_cpu(pid) - s0)
        finally:
            await a.close()
            await b.close()
    return cpu / n, Summary.of(lat).p50


# ------------------------------------------------------------------------------------ HTTP


def serve_hello(port: int, tls_port: int, cert: str, key: str) -> None:
    """A trivial aiohttp app on ``port`` (HTTP) and ``tls_port`` (HTTPS), as cm_est's hello."""
    from aiohttp import web

    async def hello(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="hello", content_type="text/plain")

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", hello)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await web.TCPSite(runner, "127.0.0.1", tls_port, ssl_context=ctx).start()
        print("hello serving", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


async def hello_tls_cpu(port: int, cafile: str, server_pid: int, seconds: float) -> float:
    """Client + server CPU per hello over TLS, 8 kept-alive connections, one request in flight each."""
    import aiohttp

    ctx = ssl.create_default_context(cafile=cafile)
    url = f"https://localhost:{port}/hello"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=8)) as session:

        async def one() -> None:
            async with session.post(url, data=b"x" * 600) as resp:
                await resp.read()

        await asyncio.gather(*(one() for _ in range(32)))
        done = 0
        s0, c0, t0 = proc_cpu(server_pid), time.process_time(), time.perf_counter()

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() - t0 < seconds:
                await one()
                done += 1

        await asyncio.gather(*(loop() for _ in range(8)))
        return ((time.process_time() - c0) + (proc_cpu(server_pid) - s0)) / done


def openssl_ocsp_one_at_a_time(tmp: Path, hello_port: int, seconds: float) -> tuple[float, float]:
    """(hello answers/s, ``openssl ocsp`` answers/s), each one at a time by ``cm_ocsp.one_at_a_time``."""
    from cm_ocsp import _get_path, one_at_a_time

    ca_key, ca = _self_signed("floor CA")
    leaf = raw_cert_builder()()
    (tmp / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp / "ca.key").write_bytes(
        ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, NO_PASSWORD)
    )
    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(days=90)).strftime("%y%m%d%H%M%SZ")
    serial = f"{leaf.serial_number:X}"
    serial = "0" * (len(serial) % 2) + serial  # whole octets, as OpenSSL's index wants
    (tmp / "index.txt").write_text(f"V\t{expires}\t\t{serial}\tunknown\t/CN=dev-000001\n")
    port = free_port()
    with (tmp / "openssl-ocsp.log").open("wb") as log_file:  # the child keeps its own descriptor
        peer = subprocess.Popen(
            [
                "openssl", "ocsp", "-index", str(tmp / "index.txt"), "-port", str(port),
                "-rsigner", str(tmp / "ca.pem"), "-rkey", str(tmp / "ca.key"), "-CA", str(tmp / "ca.pem"),
                "-nmin", "60", "-ignore_err",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        req = ocsp.OCSPRequestBuilder().add_certificate(leaf, ca, hashes.SHA1()).build()  # noqa: S303
        path = _get_path(req.public_bytes(serialization.Encoding.DER), prefix="/")
        for _ in range(100):  # not a probe connection: the responder would wait on it
            if b"waiting for OCSP client" in (tmp / "openssl-ocsp.log").read_bytes():
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"openssl ocsp did not start: {(tmp / 'openssl-ocsp.log').read_text()[-500:]}")
        one_at_a_time(port, [path], 0.3)
        peer_done, _, peer_bad = one_at_a_time(port, [path], seconds)
        one_at_a_time(hello_port, ["/hello"], 0.3)
        hello_done, _, _ = one_at_a_time(hello_port, ["/hello"], seconds)
    finally:
        peer.terminate()
        peer.wait()
    if peer_bad:
        raise SystemExit(f"openssl ocsp gave {peer_bad} answers that were not 200")
    return hello_done / seconds, peer_done / seconds


async def http_parts(quick: bool) -> tuple[float, float, float]:
    """(hello over TLS CPU per request, hello one at a time /s, openssl ocsp one at a time /s)."""
    with tempfile.TemporaryDirectory(prefix="iotdlm-floor-") as name:
        tmp = Path(name)
        key, cert = _self_signed("localhost")
        (tmp / "srv.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp / "srv.key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, NO_PASSWORD)
        )
        port, tls_port = free_port(), free_port()
        code = f"import sys; sys.path.insert(0, {str(THIS.parent)!r}); import floors; floors.serve_hello(*sys.argv[1:])"
        server = subprocess.Popen(  # noqa: ASYNC220 (started once, before anything is measured)
            [sys.executable, "-c", code, str(port), str(tls_port), str(tmp / "srv.pem"), str(tmp / "srv.key")],
            stdout=subprocess.PIPE,
        )
        try:
            assert server.stdout is not None
            if b"hello serving" not in server.stdout.readline():
                raise SystemExit("the hello server did not start")
            seconds = 1.0 if quick else 4.0
            tls = await hello_tls_cpu(int(tls_port), str(tmp / "srv.pem"), server.pid, seconds)
            hello_one, peer_one = await asyncio.to_thread(openssl_ocsp_one_at_a_time, tmp, port, seconds)
        finally:
            server.terminate()
            server.wait()
    return tls, hello_one, peer_one


def measure(quick: bool) -> tuple[Parts, float, float]:
    """The parts, then (hello answers/s one at a time, openssl ocsp answers/s one at a time)."""
    seconds = 0.15 if quick else 0.6
    log(f"floors: crypto parts (load {loadavg()})")
    c = crypto_parts(seconds)
    log("floors: SQLite")
    txn, row = sqlite_parts(500 if quick else 2000)
    log("floors: NATS round trip")
    rt, echo = asyncio.run(nats_parts(300 if quick else 2000))
    log("floors: HTTP hello over TLS; openssl ocsp and a hello, one at a time")
    tls, hello_one, peer_one = asyncio.run(http_parts(quick))
    log("floors: 2 processes building side by side")
    scaling = effective_cores(0.5 if quick else 1.5)
    parts = Parts(
        **c, nats_rt=rt, sqlite_txn=txn, sqlite_row=row, hello_tls=tls, cores=CORES, scaling=scaling, echo_wall=echo
    )
    return parts, hello_one, peer_one


# ------------------------------------------------------------------------------------ ceilings


#: the crypto parts of one single-certificate request: pm's seal, km's checks and signing, km's reply seal, pm's check
SINGLE_REQUEST_CRYPTO = ("seal", "verify", "csr_check", "build_sign", "reply_seal", "reply_verify")


def single_request_cpu(p: Parts) -> float:
    """The unavoidable CPU of one single-certificate request over the bus, pm and km together."""
    return sum(getattr(p, k) for k in SINGLE_REQUEST_CRYPTO) + p.nats_rt + p.sqlite_row


def single_request_ceiling(quick: bool) -> tuple[float, str]:
    """(certificates/s, how) that single requests over the bus could reach on this machine if
    only the unavoidable parts cost CPU (for ``cfssl_peer.py``, which has cfssl's rate beside it)."""
    c = crypto_parts(0.15 if quick else 0.6)
    _, row = sqlite_parts(500 if quick else 2000)
    rt, _ = asyncio.run(nats_parts(300 if quick else 2000))
    cores = CORES
    cpu = sum(c[k] for k in SINGLE_REQUEST_CRYPTO) + rt + row
    return cores / cpu, f"{cpu * 1e3:.3f} ms of CPU per certificate on {cores:.2f} cores"


@dataclass(frozen=True)
class Ceiling:
    figure: str  # issue 15's wording (bench/run_all.py ISSUE15)
    target: str
    best: float
    parts: str


def ceilings(p: Parts, hello_one: float, peer_one: float) -> list[Ceiling]:
    ms = 1e3
    single = single_request_cpu(p)
    envelope_work = p.seal + p.verify + p.reply_seal + p.reply_verify + p.nats_rt
    batch = p.csr_check + p.build_sign + p.sqlite_row + envelope_work / 100
    bus_request = p.seal + p.verify + p.reply_seal + p.reply_verify + p.nats_rt
    est = 2 * p.hello_tls + 2 * bus_request + p.ecdsa_sign + p.ecdsa_verify + p.csr_check + p.build_sign + p.sqlite_row
    nonce = p.hello_tls + p.nats_rt + p.ocsp_parse + p.ocsp_sign
    floor = p.echo_wall + p.csr_wall + p.sign_wall
    wait = floor + p.seal + p.verify + p.reply_seal + p.reply_verify + p.sqlite_txn
    return [
        Ceiling(
            "sustained issuance, batch 1, 2 km workers / raw build+sign",
            ">= 0.25x",
            p.cores * p.build_sign / single,
            f"{single * ms:.3f} ms of CPU per certificate on {p.cores:.2f} cores, "
            f"build+sign {p.build_sign * ms:.3f} ms",
        ),
        Ceiling(
            "sustained issuance, batch 100, 2 km workers / raw",
            ">= 0.6x",
            p.cores * p.build_sign / batch,
            f"{batch * ms:.3f} ms of CPU per certificate on {p.cores:.2f} cores",
        ),
        Ceiling(
            "EST simpleenroll through cm / aiohttp hello, same TLS",
            ">= 0.2x",
            p.hello_tls / est,
            f"{est * ms:.3f} ms of CPU per enrollment (2 HTTPS requests, 2 bus requests) against "
            f"{p.hello_tls * ms:.3f} ms per hello",
        ),
        Ceiling("OCSP GET through cm / aiohttp hello", ">= 0.6x", 1.0, "a hello: cm answers with cached bytes"),
        Ceiling(
            "OCSP with nonce (signed on demand) / raw OCSP sign",
            ">= 0.3x",
            p.cores * p.ocsp_sign / nonce,
            f"{nonce * ms:.3f} ms of CPU per answer on {p.cores:.2f} cores, OCSP sign {p.ocsp_sign * ms:.3f} ms",
        ),
        Ceiling(
            "1 certificate, pm's wait p50 / (NATS echo + CSR verify + sign)",
            "<= 3x",
            wait / floor,
            f"{wait * ms:.3f} ms at least against the floor's {floor * ms:.3f} ms (the lowest ratio possible)",
        ),
        Ceiling(
            "OCSP through cm, one at a time / openssl ocsp",
            ">= 1.5x",
            hello_one / peer_one,
            f"an aiohttp hello one at a time {hello_one:,.0f}/s, openssl ocsp {peer_one:,.0f}/s",
        ),
    ]


def reachable(c: Ceiling) -> str:
    bound = float(c.target.split()[1].rstrip("x"))
    best = round(c.best, 2)  # the verdict agrees with the ratio as shown
    ok = best >= bound if c.target.startswith(">=") else best <= bound
    return "reachable in principle" if ok else "out of reach: the parts alone miss it"


def main() -> None:
    args = parse_args("issue 15: the ceiling of each ratio, from the parts the design cannot skip")
    p, hello_one, peer_one = measure(args.quick)
    cs = ceilings(p, hello_one, peer_one)
    load = loadavg()

    def us(seconds: float) -> str:
        return f"{seconds * 1e6:.1f}" if seconds < 1e-5 else f"{seconds * 1e6:.0f}"

    parts = [
        ["certificate build + sign (cryptography, km-like extensions)", us(p.build_sign)],
        ["CSR load + signature check", us(p.csr_check)],
        ["request JWS seal (joserfc, ES256, x5c)", us(p.seal)],
        ["request JWS verify", us(p.verify)],
        ["reply seal", us(p.reply_seal)],
        ["reply verify", us(p.reply_verify)],
        ["ECDSA P-256 sign / verify (EST proof)", f"{us(p.ecdsa_sign)} / {us(p.ecdsa_verify)}"],
        ["OCSP request parse / response build + sign (nonce)", f"{us(p.ocsp_parse)} / {us(p.ocsp_sign)}"],
        ["NATS request/reply, 512 B (both clients + nats-server)", us(p.nats_rt)],
        ["SQLite, iotdlm's schema: one issuance's write transaction (nonce, device, certificate, audit)",
         us(p.sqlite_txn)],
        ["SQLite, iotdlm's schema: one issuance's rows inside a transaction of 100", us(p.sqlite_row)],
        ["aiohttp hello over TLS, kept alive (client + server)", us(p.hello_tls)],
        ["cores given to the parts (the machine's) / 2 processes building side by side, against 1",
         f"{p.cores:.0f} / {p.scaling:.2f}"],
        ["NATS echo / CSR check / build+sign, wall p50", f"{us(p.echo_wall)} / {us(p.csr_wall)} / {us(p.sign_wall)}"],
    ]  # fmt: skip
    section = "\n".join(
        [
            "## Ceilings of issue 15's ratios, from the parts the design cannot skip",
            "",
            f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, load {load}"
            + (" (--quick)" if args.quick else "")
            + ". Each ceiling is the figure if everything but these parts cost nothing (see bench/floors.py).",
            "",
            md_table(["part", "us of CPU (this run)"], parts),
            "",
            md_table(
                ["figure", "target", "ceiling", "verdict", "from"],
                [[c.figure, c.target, f"{c.best:.2f}x", reachable(c), c.parts] for c in cs],
            ),
        ]
    )
    heads = [
        Headline(
            what=f"ceiling: {c.figure}",
            paper="-",
            target=c.target,
            measured=f"{c.best:.2f}x ({c.parts})",
            verdict=reachable(c),
            yardstick="the parts the design cannot skip",
            ratio=c.best,
            load=load,
        )
        for c in cs
    ]
    emit(section, args, heads)


if __name__ == "__main__":
    if shutil.which("openssl") is None:
        raise SystemExit("floors: needs the openssl command")
    main()
