"""OCSP GET responses/s through cm (RFC 5019 over plain HTTP: ``GET /ocsp/<base64 request>``),
against a trivial aiohttp "hello" handler in one process, measured by the same load generator in
the same run.

Setup (real parts): a deployment (P-256, SQLite under the deployment), the embedded nats-server on
loopback, ``--km-workers`` km processes, cm as its own process (``python -m iotdlm.cli.cm serve``)
relaying each request to km over NATS as the cm identity. pm issues ``--certs`` operational
certificates (``issue_batch``), the operator revokes 10% (``KmClient.revoke`` as admin). One GET
URL per certificate (SHA-1 CertID, no nonce: the RFC 5019 profile whose answers km pre-signs and
caches, and HTTP caches may keep; cm keeps them too, until nextUpdate or a revocation event).
Before measuring, every URL is fetched through cm until each km worker has cached it, and a sample
of answers is checked (successful, the CertID asked, good or revoked as recorded, Cache-Control
max-age from nextUpdate).

Also, in the same run: one request at a time (one connection) through cm against OpenSSL's own
OCSP responder (``openssl ocsp -index ... -port``, same certificates and statuses, a P-256 key,
signing each answer); and GETs with a nonce (km signs each answer) against the rate at which
cryptography builds and signs such an answer in one thread.

Load generator: ``wrk`` when installed (Debian's package; ``--install-wrk`` runs ``apt-get install
-y wrk`` first), with a Lua script cycling through the URLs over kept-alive connections; otherwise
``--clients`` aiohttp processes with ``--connections`` connections in total. The "hello" server is
``bench/cm_est.py --serve-hello`` (aiohttp, one process, plain HTTP, answers ``hello``).

Run: ``.venv/bin/python bench/cm_ocsp.py [--quick] [--duration S] [--install-wrk]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from cm_est import Served, set_mode, start_cm, start_hello, until_mode_seen
from common import (
    DTYPE,
    BenchDeployment,
    Headline,
    Summary,
    baseline_table,
    bench_deployment,
    csr_der,
    device_keys,
    emit,
    load_client_context,
    loadavg,
    log,
    machine_info,
    md_table,
    measure_baseline,
    ms,
    parse_args,
    proc_cpu,
    rate,
)
from iotdlm.client.km import KmClient
from iotdlm.errors import IotdlmError
from iotdlm.runtime import connect_identity, km_trust, sealer_for
from iotdlm.wire import km as msg

REVOKE_EVERY = 10


# ------------------------------------------------------------------------------------ setup


@dataclass
class Setup:
    paths: list[str]  # /ocsp/<url-encoded base64 of the DER request>, one per certificate
    serials: list[int]
    revoked: set[int]
    request_bytes: int
    certs: list[x509.Certificate] = field(default_factory=list)
    nonce_paths: list[str] = field(default_factory=list)  # the same with a nonce: signed on demand


def _get_path(der: bytes, prefix: str = "/ocsp/") -> str:
    return prefix + urllib.parse.quote(base64.b64encode(der).decode(), safe="")


async def issue_and_revoke(bd: BenchDeployment, n: int) -> Setup:
    keys = device_keys(64)
    ids = [f"{DTYPE}-cmocsp-{i:06d}" for i in range(n)]
    await set_mode(bd, "provisioning-certificate")
    pm = await bd.pm_client()
    certs: list[x509.Certificate] = []
    for i in range(0, n, 100):
        items = [
            msg.IssueItem(device_id=ids[j], profile="operational", csr=csr_der(keys[j % 64], ids[j]))
            for j in range(i, min(n, i + 100))
        ]
        for r in await until_mode_seen(lambda items=items: pm.issue_batch(items)):  # type: ignore[misc]
            if r.certificate is None:
                raise IotdlmError(f"issuance failed for {r.device_id}: {r.error}")
            certs.append(x509.load_der_x509_certificate(r.certificate.certificate))
    await bd.close_bus(pm.bus)
    bus, ident = await connect_identity(bd.dep, "admin")
    bd.buses.append(bus)
    admin = KmClient(bus, sealer_for(ident), bd.clock, timeout=30, trust=km_trust(bd.dep))
    revoked = set()
    for c in certs[::REVOKE_EVERY]:
        await admin.revoke(serial=format(c.serial_number, "x"), issuer="operational", reason="keyCompromise")
        revoked.add(c.serial_number)
    await bd.close_bus(bus)
    await set_mode(bd, "certificate-management")
    ca = bd.dep.ca_certificate("operational")
    ders = [
        ocsp.OCSPRequestBuilder()
        .add_certificate(c, ca, hashes.SHA1())  # noqa: S303 -- RFC 5019 CertID
        .build()
        .public_bytes(serialization.Encoding.DER)
        for c in certs
    ]
    nonced = [
        ocsp.OCSPRequestBuilder()
        .add_certificate(c, ca, hashes.SHA1())  # noqa: S303 -- RFC 5019 CertID
        .add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
        .build()
        .public_bytes(serialization.Encoding.DER)
        for c in certs
    ]
    paths = [_get_path(d) for d in ders]
    serials = [c.serial_number for c in certs]
    return Setup(paths, serials, revoked, len(ders[0]), certs, [_get_path(d) for d in nonced])


# ------------------------------------------------------------------------------------ the peers


def _responder() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A P-256 key and a self-signed certificate for it (the peers' OCSP signer)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench OCSP responder")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2)).sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def start_openssl_ocsp(bd: BenchDeployment, setup: Setup) -> tuple[subprocess.Popen[bytes], int, list[str]]:
    """OpenSSL's own OCSP responder (``openssl ocsp -index ... -port``) for the same certificates:
    an index file with their status, a P-256 responder key (as km's), answers signed per request
    (it keeps no pre-signed answers), nextUpdate a day on. Returns (process, port, GET paths)."""
    from cm_est import free_port

    d = bd.dep.root / "openssl-ocsp"
    d.mkdir(exist_ok=True)
    key, cert = _responder()
    now = dt.datetime.now(dt.UTC)
    (d / "rsigner.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "rkey.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (d / "ca.pem").write_bytes(bd.dep.ca_certificate("operational").public_bytes(serialization.Encoding.PEM))
    stamp = now.strftime("%y%m%d%H%M%SZ")
    lines = []
    for i, c in enumerate(setup.certs):
        state, when = ("R", f"{stamp},keyCompromise") if c.serial_number in setup.revoked else ("V", "")
        expiry = c.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
        serial = f"{c.serial_number:X}"
        serial = "0" * (len(serial) % 2) + serial  # whole octets, as OpenSSL's index wants
        lines.append(f"{state}\t{expiry}\t{when}\t{serial}\tunknown\t/CN=device-{i}\n")
    (d / "index.txt").write_text("".join(lines))
    port = free_port()
    argv = ["openssl", "ocsp", "-index", "index.txt", "-port", str(port), "-rsigner", "rsigner.pem",
            "-rkey", "rkey.pem", "-CA", "ca.pem", "-ndays", "1"]  # fmt: skip
    with (d / "responder.log").open("wb") as out:
        proc = subprocess.Popen(argv, cwd=d, stdout=out, stderr=subprocess.STDOUT)
    paths = ["/" + p.removeprefix("/ocsp/") for p in setup.paths]
    return proc, port, paths


async def check_openssl(base: str, setup: Setup, paths: list[str]) -> None:
    """Until it answers; then each of a sample says what cm says (good or revoked)."""
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            try:
                async with http.get(base + paths[0]) as resp:
                    await resp.read()
                break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        else:
            raise RuntimeError(f"openssl ocsp does not answer at {base}: see its log in the deployment's openssl-ocsp/")
        for i in range(0, len(paths), 10):
            async with http.get(base + paths[i]) as resp:
                answer = ocsp.load_der_ocsp_response(await resp.read())
            want = ocsp.OCSPCertStatus.REVOKED if setup.serials[i] in setup.revoked else ocsp.OCSPCertStatus.GOOD
            if answer.certificate_status is not want:
                raise RuntimeError(f"openssl ocsp says {answer.certificate_status} for certificate {i}, not {want}")


def one_at_a_time(port: int, paths: list[str], seconds: float) -> tuple[int, list[float], int]:
    """The one-at-a-time load generator: a blocking socket, the next GET when the answer is in,
    the connection kept while the server keeps it (HTTP/1.1), a new one when it closes (OpenSSL's
    responder answers HTTP/1.0 and closes). Returns (200s, latencies, other answers). Lighter than
    an aiohttp client, so that the server, not the client, sets the pace."""
    sock: socket.socket | None = None
    done, bad, lat = 0, 0, []
    perf = time.perf_counter
    deadline = perf() + seconds
    i = 0
    while perf() < deadline:
        i += 1
        t0 = perf()
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.settimeout(10.0)  # a server that stops answering fails the run instead of hanging it
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(f"GET {paths[i % len(paths)]} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        if head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")) and len(body) == length:
            done += 1
            lat.append(perf() - t0)
        else:
            bad += 1
        if head.startswith(b"HTTP/1.0") or b"connection: close" in head.lower():
            sock.close()
            sock = None
    if sock is not None:
        sock.close()
    return done, lat, bad


async def run_one_at_a_time(
    bd: BenchDeployment, *, what: str, port: int, paths: list[str], server_pid: int, seconds: float
) -> LoadRun:
    assert bd.server.pid is not None
    srv0, km0 = proc_cpu(server_pid), sum(proc_cpu(p) for p in bd.worker_pids())
    load = loadavg()
    done, lat, bad = await asyncio.to_thread(one_at_a_time, port, paths, seconds)
    srv1, km1 = proc_cpu(server_pid), sum(proc_cpu(p) for p in bd.worker_pids())
    s = Summary.of(lat) if lat else None
    return LoadRun(
        what=what,
        generator="one blocking socket",
        connections=1,
        seconds=seconds,
        done=done,
        non_2xx=bad,
        errors=0,
        rate=done / seconds,
        p50=s.p50 if s else None,
        p99=sorted(lat)[int(len(lat) * 0.99)] if lat else None,
        server_cpu=srv1 - srv0,
        km_cpu=km1 - km0,
        nats_cpu=0.0,
        client_cpu=0.0,
        load=load,
    )


def raw_nonce_sign_rate(setup: Setup, ca: x509.Certificate, seconds: float) -> float:
    """OCSP answers/s that cryptography builds and signs (P-256, a nonce, one thread): the yardstick
    of the signed-on-demand row."""
    key, responder = _responder()
    now = dt.datetime.now(dt.UTC)
    leaf = setup.certs[0]
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        (
            ocsp.OCSPResponseBuilder()
            .add_response(
                cert=leaf, issuer=ca, algorithm=hashes.SHA1(), cert_status=ocsp.OCSPCertStatus.GOOD,  # noqa: S303
                this_update=now, next_update=now + dt.timedelta(hours=1), revocation_time=None, revocation_reason=None,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, responder)
            .add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.DER)
        )  # fmt: skip
        n += 1
    return n / elapsed


async def warm_and_check(base: str, setup: Setup, workers: int) -> tuple[int, int]:
    """Fetch every URL through cm until each km worker has answered it from its cache (a cached
    answer is the same bytes each time); check a sample. Returns (passes, distinct answers)."""
    seen: list[set[bytes]] = [set() for _ in setup.paths]
    checked = 0
    now = dt.datetime.now(dt.UTC)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as http:

        async def one(i: int) -> None:
            nonlocal checked
            async with http.get(base + setup.paths[i]) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"cm answered {resp.status} for certificate {i}: {body[:200]!r}")
                if i % 20 == 0 and not seen[i]:
                    answer = ocsp.load_der_ocsp_response(body)
                    if answer.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
                        raise RuntimeError(f"OCSP status {answer.response_status}")
                    if answer.serial_number != setup.serials[i]:
                        raise RuntimeError("the answer is for another certificate")
                    want = (
                        ocsp.OCSPCertStatus.REVOKED if setup.serials[i] in setup.revoked else ocsp.OCSPCertStatus.GOOD
                    )
                    if answer.certificate_status is not want:
                        raise RuntimeError(f"certificate {i} is {answer.certificate_status}, expected {want}")
                    next_update = answer.next_update_utc
                    max_age = int(resp.headers["Cache-Control"].split("max-age=")[1].split(",")[0])
                    if next_update is None or abs((next_update - now).total_seconds() - max_age) > 120:
                        raise RuntimeError(f"max-age {max_age} does not follow nextUpdate {next_update}")
                    checked += 1
                seen[i].add(body)

        passes = 0
        while passes < 20:
            passes += 1
            before = sum(len(x) for x in seen)
            await asyncio.gather(*(one(i) for i in range(len(setup.paths))))
            if min(len(x) for x in seen) >= workers and sum(len(x) for x in seen) == before:
                break
    if checked == 0:
        raise RuntimeError("no answer was checked")
    return passes, max(len(x) for x in seen)


# ------------------------------------------------------------------------------------ wrk


def find_wrk(install: bool) -> str | None:
    found = shutil.which("wrk")
    if found or not install:
        return found
    log("installing wrk (apt-get install -y wrk)")
    subprocess.run(["apt-get", "install", "-y", "wrk"], check=False, capture_output=True, timeout=600)
    return shutil.which("wrk")


@dataclass
class LoadRun:
    what: str
    generator: str
    connections: int
    seconds: float
    done: int
    non_2xx: int
    errors: int
    rate: float
    p50: float | None
    p99: float | None
    server_cpu: float
    km_cpu: float
    nats_cpu: float
    client_cpu: float
    load: str
    note: str = ""


def _lua(paths: list[str], path: Path) -> None:
    lines = ["local paths = {"] + [f'  "{p}",' for p in paths] + ["}"]
    lines += [
        "local i = math.random(#paths)",
        "request = function()",
        "  i = i % #paths + 1",
        '  return wrk.format("GET", paths[i])',
        "end",
    ]
    path.write_text("\n".join(lines) + "\n")


def _wrk_seconds(text: str) -> float | None:
    m = re.search(r"([0-9.]+)(us|ms|s)\b", text)
    if m is None:
        return None
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]
    return float(m.group(1)) * scale


def _run_wrk(wrk: str, url: str, lua: Path | None, threads: int, connections: int, seconds: float) -> tuple[str, float]:
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "10s"]
    if lua is not None:
        argv += ["-s", str(lua)]
    argv.append(url)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _pid, _status, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    out = proc.stdout.read().decode() if proc.stdout is not None else ""
    return out, usage.ru_utime + usage.ru_stime


async def run_wrk(
    bd: BenchDeployment,
    wrk: str,
    *,
    what: str,
    base: str,
    lua: Path | None,
    path: str,
    server_pid: int,
    threads: int,
    connections: int,
    seconds: float,
) -> LoadRun:
    assert bd.server.pid is not None
    srv0, km0, nats0 = proc_cpu(server_pid), sum(proc_cpu(p) for p in bd.worker_pids()), proc_cpu(bd.server.pid)
    load = loadavg()
    out, client_cpu = await asyncio.to_thread(_run_wrk, wrk, base + path, lua, threads, connections, seconds)
    srv1, km1, nats1 = proc_cpu(server_pid), sum(proc_cpu(p) for p in bd.worker_pids()), proc_cpu(bd.server.pid)
    m = re.search(r"(\d+) requests in ([0-9.]+)(m?s)", out)
    if m is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    done = int(m.group(1))
    took = float(m.group(2)) / (1000.0 if m.group(3) == "ms" else 1.0)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    lat = {q: _wrk_seconds(v) for q, v in re.findall(r"^\s+(50|99)%\s+(\S+)", out, flags=re.M)}
    bad = int(non2xx.group(1)) if non2xx else 0
    return LoadRun(
        what=what,
        generator=f"wrk -t{threads} -c{connections}",
        connections=connections,
        seconds=took,
        done=done - bad,
        non_2xx=bad,
        errors=sum(int(x) for x in sock.groups()) if sock else 0,
        rate=(done - bad) / took,
        p50=lat.get("50"),
        p99=lat.get("99"),
        server_cpu=srv1 - srv0,
        km_cpu=km1 - km0,
        nats_cpu=nats1 - nats0,
        client_cpu=client_cpu,
        load=load,
    )


# ------------------------------------------------------------------------------------ aiohttp generator


@dataclass(frozen=True)
class ClientConfig:
    base: str
    paths: list[str]
    connections: int
    offset: int


@dataclass
class ClientResult:
    done: int = 0
    late: int = 0
    non_2xx: int = 0
    errors: int = 0
    first_error: str = ""
    latencies: list[float] = field(default_factory=list)
    cpu: float = 0.0


def client_process(cfg: ClientConfig, conn: Connection) -> None:
    asyncio.run(_client(cfg, conn))


async def _client(cfg: ClientConfig, conn: Connection) -> None:
    res = ClientResult()
    perf = time.perf_counter
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=cfg.connections), timeout=aiohttp.ClientTimeout(total=30)
    ) as http:
        # open the connections before the clock starts
        await asyncio.gather(*(http.get(cfg.base + cfg.paths[0]) for _ in range(cfg.connections)))
        conn.send("ready")
        start_at, duration = conn.recv()
        await asyncio.sleep(max(0.0, start_at - time.time()))
        deadline = perf() + duration
        cpu0 = time.process_time()
        n = len(cfg.paths)

        async def loop(k: int) -> None:
            i = cfg.offset + k
            while perf() < deadline:
                i += cfg.connections
                t0 = perf()
                try:
                    async with http.get(cfg.base + cfg.paths[i % n]) as resp:
                        await resp.read()
                        status = resp.status
                except Exception as exc:  # a benchmark counts failures, it does not stop
                    res.errors += 1
                    res.first_error = res.first_error or f"{type(exc).__name__}: {exc}"
                    continue
                t1 = perf()
                if status != 200:
                    res.non_2xx += 1
                elif t1 <= deadline:
                    res.done += 1
                    res.latencies.append(t1 - t0)
                else:
                    res.late += 1

        await asyncio.gather(*(loop(k) for k in range(cfg.connections)))
        res.cpu = time.process_time() - cpu0
    conn.send(asdict(res))
    conn.close()


async def run_aiohttp(
    bd: BenchDeployment,
    *,
    what: str,
    base: str,
    paths: list[str],
    server_pid: int,
    clients: int,
    connections: int,
    seconds: float,
) -> LoadRun:
    ctx = load_client_context()
    procs, conns = [], []
    per = max(1, connections // clients)
    for k in range(clients):
        parent, child = ctx.Pipe()
        cfg = ClientConfig(base=base, paths=paths, connections=per, offset=k * 7919)
        p = ctx.Process(target=client_process, args=(cfg, child), daemon=True)
        p.start()
        child.close()
        procs.append(p)
        conns.append(parent)
    loop = asyncio.get_running_loop()
    for c in conns:
        if (got := await loop.run_in_executor(None, c.recv)) != "ready":
            raise RuntimeError(f"load client said {got!r}")
    start_at = time.time() + 0.3
    for c in conns:
        c.send((start_at, seconds))
    assert bd.server.pid is not None
    await asyncio.sleep(max(0.0, start_at - time.time()))
    srv0, km0, nats0 = proc_cpu(server_pid), sum(proc_cpu(p) for p in bd.worker_pids()), proc_cpu(bd.server.pid)
    load = loadavg()
    await asyncio.sleep(seconds)
    srv1, km1, nats1 = proc_cpu(server_pid), sum(proc_cpu(p) for p in bd.worker_pids()), proc_cpu(bd.server.pid)
    results = [await loop.run_in_executor(None, c.recv) for c in conns]
    for p in procs:
        p.join(timeout=30)
    lat = [x for r in results for x in r["latencies"]]
    s = Summary.of(lat) if lat else None
    done = sum(r["done"] for r in results)
    errs = [r["first_error"] for r in results if r["first_error"]]
    return LoadRun(
        what=what,
        generator=f"aiohttp, {clients} processes x {per} connections",
        connections=per * clients,
        seconds=seconds,
        done=done,
        non_2xx=sum(r["non_2xx"] for r in results),
        errors=sum(r["errors"] for r in results),
        rate=done / seconds,
        p50=s.p50 if s else None,
        p99=sorted(lat)[int(len(lat) * 0.99)] if lat else None,
        server_cpu=srv1 - srv0,
        km_cpu=km1 - km0,
        nats_cpu=nats1 - nats0,
        client_cpu=sum(r["cpu"] for r in results),
        load=load,
        note=errs[0][:100] if errs else "",
    )


# ------------------------------------------------------------------------------------ main


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=None, help="seconds per measured run (default 10; 2 quick)")
    p.add_argument("--certs", type=int, default=None, help="certificates (URLs) to cycle through (default 500)")
    p.add_argument("--connections", type=int, default=32, help="kept-alive connections of the load generator")
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--clients", type=int, default=2, help="aiohttp load processes (without wrk)")
    p.add_argument("--km-workers", type=int, default=1, help="km worker processes")
    p.add_argument("--repeats", type=int, default=None, help="runs per configuration (default 3; 1 quick)")
    p.add_argument("--install-wrk", action="store_true", help="apt-get install -y wrk when it is missing")
    p.add_argument("--no-wrk", action="store_true", help="use the aiohttp load generator even if wrk is installed")


HELLO = "aiohttp hello handler (plain HTTP, one process)"
MANY_CM = "OCSP GET through cm (cm's kept answers)"
ONE_CM = "OCSP GET through cm, one at a time"
ONE_OPENSSL = "openssl ocsp responder, one at a time (GET, signs each answer)"
NONCE_CM = "OCSP GET with a nonce through cm (km signs each answer)"


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if s else 0.0


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _verdict(a: float, b: float, target: float) -> str:
    return "-" if not b else ("met" if a / b >= target else "not met")


def _cpu(cpu: float, done: int) -> str:
    return f"{cpu / done * 1e6:,.0f}" if done and cpu else "-"


async def main(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    quick = args.quick
    seconds = args.duration or (2.0 if quick else 10.0)
    repeats = args.repeats or (1 if quick else 3)
    n = args.certs or (100 if quick else 500)
    wrk = None if args.no_wrk else find_wrk(args.install_wrk)
    info = machine_info()
    log("baseline (raw library rates)")
    before = measure_baseline(quick)
    runs: list[LoadRun] = []
    raw_sign: list[float] = []
    async with bench_deployment(args.km_workers) as bd:
        log(f"{n} operational certificates, 1 in {REVOKE_EVERY} revoked")
        setup = await issue_and_revoke(bd, n)
        cm: Served = await start_cm(bd, http=True)
        hello: Served = await start_hello(bd, tls=False)
        peer, peer_port, peer_paths = start_openssl_ocsp(bd, setup)
        try:
            base = f"http://127.0.0.1:{cm.http_port}"
            passes, distinct = await warm_and_check(base, setup, args.km_workers)
            log(f"warmed km's and cm's caches in {passes} pass(es)")
            hello_base = f"http://127.0.0.1:{hello.http_port}"
            peer_base = f"http://127.0.0.1:{peer_port}"
            await check_openssl(peer_base, setup, peer_paths)
            ca = bd.dep.ca_certificate("operational")
            paths_of = {base: setup.paths, peer_base: peer_paths, hello_base: ["/hello"]}

            async def load(rep: int, what: str, url: str, pid: int, paths: list[str], connections: int) -> LoadRun:
                log(f"run {rep + 1}/{repeats}: {what}")
                if wrk is None:
                    clients = 1 if connections == 1 else args.clients
                    return await run_aiohttp(
                        bd, what=what, base=url, paths=paths, server_pid=pid, clients=clients,
                        connections=connections, seconds=seconds,
                    )  # fmt: skip
                lua_file = None
                if paths != ["/hello"]:
                    lua_file = bd.dep.root / f"paths-{abs(hash((url, paths[0])))}.lua"
                    _lua(paths, lua_file)
                return await run_wrk(
                    bd, wrk, what=what, base=url, lua=lua_file, path=paths[0] if lua_file is None else "/",
                    server_pid=pid, threads=1 if connections == 1 else args.threads, connections=connections,
                    seconds=seconds,
                )  # fmt: skip

            ca = bd.dep.ca_certificate("operational")
            for rep in range(repeats):
                # one request at a time (one connection, the next request when the answer is in)
                for what, port, pid, paths in (
                    (ONE_CM, cm.http_port, cm.proc.pid, setup.paths),
                    (ONE_OPENSSL, peer_port, peer.pid, peer_paths),
                ):
                    log(f"run {rep + 1}/{repeats}: {what}")
                    assert port is not None
                    runs.append(
                        await run_one_at_a_time(
                            bd, what=what, port=port, paths=paths, server_pid=pid, seconds=seconds
                        )
                    )  # fmt: skip
                runs.append(await load(rep, NONCE_CM, base, cm.proc.pid, setup.nonce_paths, args.connections))
                raw_sign.append(await asyncio.to_thread(raw_nonce_sign_rate, setup, ca, min(seconds, 2.0)))
                runs.append(await load(rep, HELLO, hello_base, hello.proc.pid, paths_of[hello_base], args.connections))
                runs.append(await load(rep, MANY_CM, base, cm.proc.pid, paths_of[base], args.connections))
        finally:
            cm.stop()
            hello.stop()
            peer.terminate()
            peer.wait(timeout=10)
    after = measure_baseline(quick)
    rows = [
        [
            r.what,
            r.generator,
            rate(r.rate),
            ms(r.p50) if r.p50 is not None else "-",
            ms(r.p99) if r.p99 is not None else "-",
            f"{r.non_2xx} / {r.errors}",
            _cpu(r.server_cpu, r.done),
            _cpu(r.km_cpu, r.done),
            _cpu(r.nats_cpu, r.done),
            _cpu(r.client_cpu, r.done),
            r.load,
        ]
        for r in runs
    ]
    hello_med = _median([r.rate for r in runs if r.what.startswith("aiohttp")])
    ocsp_med = _median([r.rate for r in runs if r.what == MANY_CM])
    one_cm = _median([r.rate for r in runs if r.what == ONE_CM])
    one_peer = _median([r.rate for r in runs if r.what == ONE_OPENSSL])
    nonce_med = _median([r.rate for r in runs if r.what == NONCE_CM])
    raw_med = _median(raw_sign)
    gen = "wrk (Debian package)" if wrk is not None else f"aiohttp ({args.clients} processes; wrk not installed)"
    lines = [
        "## cm: OCSP GET responses/s through cm",
        "",
        md_table(
            ["", ""], [[k, v] for k, v in info.items()] + [["run time", f"{time.perf_counter() - t_start:.0f} s"]]
        ),
        "",
        f"{n} certificates (1 in {REVOKE_EVERY} revoked), one RFC 5019 GET URL each ({setup.request_bytes}-byte "
        f"requests, SHA-1 CertID, no nonce), cycled over {args.connections} kept-alive connections by {gen}; "
        f"{seconds:g} s per run, {repeats} run(s) each, alternating; {args.km_workers} km worker(s); cm and the "
        f"hello server are one process each. km's cache warmed in {passes} pass(es) ({distinct} distinct answer(s) "
        f"per certificate); sampled answers checked (successful, right CertID, good/revoked as recorded, "
        f"max-age from nextUpdate). All on this {info['nproc']}-core machine: load generator, cm, km, nats-server.",
        "",
        md_table(
            [
                "what",
                "load generator",
                "responses/s",
                "p50 ms",
                "p99 ms",
                "non-2xx / socket errors",
                "server CPU us/resp",
                "km CPU us/resp",
                "nats CPU us/resp",
                "client CPU us/resp",
                "load avg",
            ],
            rows,
        ),
        "",
        md_table(
            ["summary", "median responses/s"],
            [
                ["aiohttp hello (one process)", rate(hello_med)],
                ["OCSP GET through cm", rate(ocsp_med)],
                ["OCSP / hello", _ratio(ocsp_med, hello_med)],
                ["OCSP through cm, one at a time", rate(one_cm)],
                ["openssl ocsp responder, one at a time", rate(one_peer)],
                ["cm / openssl, one at a time", _ratio(one_cm, one_peer)],
                [f"OCSP with a nonce through cm ({args.connections} connections)", rate(nonce_med)],
                ["raw OCSP sign rate (cryptography, P-256, nonce, one thread)", rate(raw_med)],
                ["nonce through cm / raw sign", _ratio(nonce_med, raw_med)],
            ],
        ),
        "",
        baseline_table(before, after),
    ]
    emit(
        "\n".join(lines),
        args,
        [
            Headline(
                what=f"OCSP GET through cm / aiohttp hello, {args.km_workers} km worker(s)",
                paper="-",
                target=">= 0.6x",
                measured=f"{_ratio(ocsp_med, hello_med)} ({rate(ocsp_med)}/s vs {rate(hello_med)}/s)",
                verdict=_verdict(ocsp_med, hello_med, 0.6),
            ),
            Headline(
                what="OCSP through cm, one at a time / openssl ocsp responder, one at a time",
                paper="-",
                target=">= 1.5x",
                measured=f"{_ratio(one_cm, one_peer)} ({rate(one_cm)}/s vs {rate(one_peer)}/s)",
                verdict=_verdict(one_cm, one_peer, 1.5),
            ),
            Headline(
                what="OCSP with nonce through cm (signed on demand) / raw OCSP sign rate",
                paper="-",
                target=">= 0.3x",
                measured=f"{_ratio(nonce_med, raw_med)} ({rate(nonce_med)}/s vs {rate(raw_med)}/s)",
                verdict=_verdict(nonce_med, raw_med, 0.3),
            ),
        ],
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parse_args(__doc__.splitlines()[0] if __doc__ else "cm OCSP bench", _extra)))
