"""EST simpleenroll/s through cm (RFC 7030 over HTTPS with mutual TLS), against a trivial aiohttp
"hello" handler behind the same TLS setup, measured in the same run.

Setup (real parts): a deployment (P-256, SQLite under the deployment), the embedded nats-server on
loopback, ``--km-workers`` km processes (``python -m iotdlm.cli.main km serve``), cm as its own
process (``python -m iotdlm.cli.cm serve``), connecting to NATS as the cm identity. pm issues one
factory certificate per simulated device (``issue_batch``, profile factory).

Load: ``--clients`` load-generator processes (multiprocessing, spawn), each driving ``--inflight``
devices; every device has its own aiohttp session presenting its factory certificate (mutual TLS),
one kept-alive connection, one request in flight, and cycles through four pre-made CSRs (new
P-256 keys, made before the run: the device's key generation is not measured). A response counts
if it is a 200 whose certs-only CMS parses and holds a certificate for the CSR's key (checked for
every response). Each device's TLS handshake happens before the clock starts.

The "hello" server is this script (``--serve-hello``): one process, aiohttp, the same TLS context
as cm (cm's certificate, client certificates optional and verified against the deployment's CAs),
``POST /hello`` answers ``hello``. The same load generator drives it with the same devices and
bodies: the gap between the two rows is what EST costs beyond HTTPS+mTLS in one Python process
(cm's handler, the NATS round trip, km's checks, signing and the database write).

Run: ``.venv/bin/python bench/cm_est.py [--quick] [--duration S] [--clients N] [--inflight N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from common import (
    DTYPE,
    REPO,
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
from iotdlm.errors import IotdlmError
from iotdlm.pki import est_proof
from iotdlm.wire import km as msg

_T = TypeVar("_T")
CSRS_PER_DEVICE = 4
THIS = Path(__file__).resolve()


# ------------------------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    """A server process (cm or hello) and its log."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    https_port: int
    http_port: int | None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)


async def _wait_for(served: Served, marker: bytes, what: str, wait: float = 60.0) -> None:
    deadline = time.monotonic() + wait
    while marker not in served.log_path.read_bytes():
        if served.proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {served.proc.returncode}:\n{served.log_path.read_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start within {wait} s; see {served.log_path}")
        await asyncio.sleep(0.05)


async def start_cm(bd: BenchDeployment, *, http: bool = True) -> Served:
    """cm as its own process on free loopback ports (no egress proxy)."""
    https_port = free_port()
    http_port = free_port() if http else None
    log_path = bd.dep.root / "logs" / f"cm-{https_port}.log"
    argv = [sys.executable, "-m", "iotdlm.cli.cm", "serve", "--data", str(bd.dep.root), "--https-port", str(https_port)]
    argv += ["--http-port", str(http_port)] if http_port else ["--no-http"]
    served = Served(_spawn(argv, log_path), log_path, https_port, http_port)
    await _wait_for(served, b"cm serving", "cm")
    return served


async def start_hello(bd: BenchDeployment, *, tls: bool) -> Served:
    """This script's trivial aiohttp server (``--serve-hello``), one process."""
    port = free_port()
    log_path = bd.dep.root / "logs" / f"hello-{port}.log"
    argv = [sys.executable, str(THIS), "--serve-hello", str(port), "--data", str(bd.dep.root)]
    if tls:
        argv.append("--tls")
    served = Served(_spawn(argv, log_path), log_path, port if tls else 0, None if tls else port)
    await _wait_for(served, b"hello serving", "hello server")
    return served


def serve_hello(port: int, data: Path, tls: bool) -> None:
    """The baseline: aiohttp with one trivial handler, cm's TLS context when ``tls``."""
    from aiohttp import web

    from iotdlm.clock import SystemClock
    from iotdlm.cm.service import deployment_tls
    from iotdlm.deployment import Deployment

    async def hello(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="hello", content_type="text/plain")

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", hello)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        ctx = deployment_tls(Deployment.load(data), now=SystemClock().now()).context if tls else None
        site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx, backlog=512)
        await site.start()
        print("hello serving", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


# ------------------------------------------------------------------------------------ operation mode


async def set_mode(bd: BenchDeployment, mode: str) -> None:
    """Publish the operation mode as the supervisor does (Table 1; km and cm check it themselves):
    provisioning-certificate while pm gets factory certificates, certificate-management for cm."""
    import datetime as dt

    from iotdlm.bus import subjects
    from iotdlm.modes.signed import seal_record
    from iotdlm.runtime import connect_identity, sealer_for
    from iotdlm.wire.modes import ModeRecord

    bus, ident = await connect_identity(bd.dep, "modes")
    try:
        kv = await bus.key_value(subjects.MODE_BUCKET, create=True)
        now = dt.datetime.now(dt.UTC)
        record = ModeRecord(mode=mode, since=now.isoformat(), by="bench")
        await kv.put(subjects.MODE_KEY, seal_record(sealer_for(ident), record, now=now))
    finally:
        await bus.close()


async def until_mode_seen(attempt: Callable[[], Awaitable[_T]], wait: float = 15.0) -> _T:
    """Retry ``attempt`` while services have not seen the new mode yet (ModeError)."""
    from iotdlm.errors import ModeError

    deadline = time.monotonic() + wait
    while True:
        try:
            return await attempt()
        except ModeError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


# ------------------------------------------------------------------------------------ devices


@dataclass(frozen=True)
class Device:
    device_id: str
    cert_pem: bytes
    key_pem: bytes
    csrs: tuple[bytes, ...]  # base64 bodies, ready to send
    keys_spki: tuple[bytes, ...]  # the CSRs' public keys (SubjectPublicKeyInfo DER)


async def make_devices(bd: BenchDeployment, n: int) -> list[Device]:
    """n devices with factory certificates issued through pm (issue_batch, profile factory)."""
    factory_keys = device_keys(n)
    ids = [f"{DTYPE}-est-{i:05d}" for i in range(n)]
    await set_mode(bd, "provisioning-certificate")
    pm = await bd.pm_client()
    certs: list[x509.Certificate] = []
    for i in range(0, n, 100):
        items = [
            msg.IssueItem(device_id=ids[j], profile="factory", csr=csr_der(factory_keys[j], ids[j]))
            for j in range(i, min(n, i + 100))
        ]
        for r in await until_mode_seen(lambda items=items: pm.issue_batch(items)):  # type: ignore[misc]
            if r.certificate is None:
                raise IotdlmError(f"factory certificate for {r.device_id} failed: {r.error}")
            certs.append(x509.load_der_x509_certificate(r.certificate.certificate))
    await bd.close_bus(pm.bus)
    await set_mode(bd, "certificate-management")
    out = []
    for i in range(n):
        keys = device_keys(CSRS_PER_DEVICE)
        out.append(
            Device(
                device_id=ids[i],
                cert_pem=certs[i].public_bytes(serialization.Encoding.PEM),
                key_pem=factory_keys[i].private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                ),
                csrs=tuple(base64.encodebytes(csr_der(k, ids[i])) for k in keys),
                keys_spki=tuple(
                    k.public_key().public_bytes(
                        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                    )
                    for k in keys
                ),
            )
        )
    return out


def client_context(root_pem: bytes, cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=root_pem.decode())
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "c.pem").write_bytes(cert_pem)
        (Path(d) / "k.pem").write_bytes(key_pem)
        ctx.load_cert_chain(str(Path(d) / "c.pem"), str(Path(d) / "k.pem"))
    return ctx


# ------------------------------------------------------------------------------------ load generator


@dataclass(frozen=True)
class ClientConfig:
    url: str  # full URL of the endpoint
    root_pem: bytes
    devices: list[Device]
    check: bool  # EST: parse every response and match the key


@dataclass
class ClientResult:
    done: int = 0
    late: int = 0
    errors: int = 0
    first_error: str = ""
    latencies: list[float] = field(default_factory=list)
    cpu: float = 0.0


def client_process(cfg: ClientConfig, conn: Connection) -> None:
    asyncio.run(_client(cfg, conn))


def _issued_for(body: bytes, spki: bytes) -> bool:
    certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))
    return any(
        c.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == spki
        for c in certs
    )


async def _client(cfg: ClientConfig, conn: Connection) -> None:
    import aiohttp

    sessions = [
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                ssl=client_context(cfg.root_pem, d.cert_pem, d.key_pem), limit=1, force_close=False
            ),
            timeout=aiohttp.ClientTimeout(total=60),
        )
        for d in cfg.devices
    ]
    headers = {"Content-Type": "application/pkcs10"}
    res = ClientResult()
    perf = time.perf_counter
    nonce_url = cfg.url.rsplit("/", 1)[0] + "/iotdlm-nonce"
    operation = cfg.url.rsplit("/", 1)[1]
    proof_keys = [serialization.load_pem_private_key(d.key_pem, None) for d in cfg.devices]
    new_keys = [[serialization.load_der_public_key(s) for s in d.keys_spki] for d in cfg.devices]

    async def proof(k: int, n: int) -> dict[str, str]:
        """ADR 0008: km's nonce for this client certificate, signed with the factory key (an EST
        enrollment is these two requests: the device's real flow)."""
        async with sessions[k].get(nonce_url) as resp:
            nonce = json.loads(await resp.read())["nonce"]
        key = proof_keys[k]
        return {
            est_proof.HEADER: est_proof.make(key, operation, nonce, new_keys[k][n % CSRS_PER_DEVICE])  # type: ignore[arg-type]
        }

    async def once(k: int, n: int) -> tuple[bool, str]:
        d = cfg.devices[k]
        body = d.csrs[n % CSRS_PER_DEVICE]
        extra = await proof(k, n) if cfg.check else {}
        async with sessions[k].post(cfg.url, data=body, headers={**headers, **extra}) as resp:
            data = await resp.read()
            if resp.status != 200:
                return False, f"HTTP {resp.status}: {data[:200]!r}"
            if cfg.check and not _issued_for(data, d.keys_spki[n % CSRS_PER_DEVICE]):
                return False, "the response holds no certificate for the CSR's key"
            return True, ""

    # connect every device (TLS handshake with its client certificate) before the clock starts
    for k in range(len(cfg.devices)):
        ok, why = await once(k, 0)
        if not ok:
            res.errors += 1
            res.first_error = res.first_error or why
    conn.send("ready")
    start_at, duration = conn.recv()
    await asyncio.sleep(max(0.0, start_at - time.time()))
    deadline = perf() + duration
    cpu0 = time.process_time()

    async def loop(k: int) -> None:
        n = 1
        while perf() < deadline:
            t0 = perf()
            try:
                ok, why = await once(k, n)
            except Exception as exc:  # a benchmark counts failures, it does not stop
                ok, why = False, f"{type(exc).__name__}: {exc}"
            n += 1
            t1 = perf()
            if not ok:
                res.errors += 1
                res.first_error = res.first_error or why
            elif t1 <= deadline:
                res.done += 1
                res.latencies.append(t1 - t0)
            else:
                res.late += 1

    await asyncio.gather(*(loop(k) for k in range(len(cfg.devices))))
    res.cpu = time.process_time() - cpu0
    for s in sessions:
        with contextlib.suppress(Exception):
            await s.close()
    conn.send(asdict(res))
    conn.close()


@dataclass
class LoadRun:
    what: str
    clients: int
    inflight: int
    seconds: float
    done: int
    errors: int
    first_error: str
    latencies: list[float]
    server_cpu: float
    km_cpu: float
    nats_cpu: float
    client_cpu: float
    load: str

    @property
    def rate(self) -> float:
        return self.done / self.seconds


async def run_load(
    bd: BenchDeployment,
    *,
    what: str,
    url: str,
    devices: list[Device],
    clients: int,
    seconds: float,
    server_pid: int,
    check: bool,
) -> LoadRun:
    ctx = load_client_context()
    root_pem = (bd.dep.root / "ca" / "root.pem").read_bytes()
    per = len(devices) // clients
    procs, conns = [], []
    for k in range(clients):
        parent, child = ctx.Pipe()
        cfg = ClientConfig(url=url, root_pem=root_pem, devices=devices[k * per : (k + 1) * per], check=check)
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
    srv0 = proc_cpu(server_pid)
    km0 = sum(proc_cpu(p) for p in bd.worker_pids())
    nats0 = proc_cpu(bd.server.pid)
    load = loadavg()
    await asyncio.sleep(seconds)
    srv1 = proc_cpu(server_pid)
    km1 = sum(proc_cpu(p) for p in bd.worker_pids())
    nats1 = proc_cpu(bd.server.pid)
    results = [await loop.run_in_executor(None, c.recv) for c in conns]
    for p in procs:
        p.join(timeout=30)
    errs = [r["first_error"] for r in results if r["first_error"]]
    return LoadRun(
        what=what,
        clients=clients,
        inflight=per,
        seconds=seconds,
        done=sum(r["done"] for r in results),
        errors=sum(r["errors"] for r in results),
        first_error=errs[0] if errs else "",
        latencies=[x for r in results for x in r["latencies"]],
        server_cpu=srv1 - srv0,
        km_cpu=km1 - km0,
        nats_cpu=nats1 - nats0,
        client_cpu=sum(r["cpu"] for r in results),
        load=load,
    )


def run_rows(runs: list[LoadRun]) -> list[list[str]]:
    rows = []
    for r in runs:
        s = Summary.of(r.latencies) if r.latencies else None

        def per_req(cpu: float, done: int = r.done) -> str:
            return f"{cpu / done * 1e6:,.0f}" if done else "-"

        rows.append(
            [
                r.what,
                f"{r.clients} x {r.inflight}",
                rate(r.rate),
                ms(s.p50) if s else "-",
                ms(s.p95) if s else "-",
                f"{r.errors}",
                per_req(r.server_cpu),
                per_req(r.km_cpu) if r.km_cpu else "-",
                per_req(r.nats_cpu) if r.nats_cpu else "-",
                per_req(r.client_cpu),
                r.load,
            ]
        )
    return rows


RUN_HEADERS = [
    "what",
    "clients x in flight",
    "responses/s",
    "p50 ms",
    "p95 ms",
    "errors",
    "server CPU us/resp",
    "km CPU us/resp",
    "nats CPU us/resp",
    "client CPU us/resp",
    "load avg",
]


# ------------------------------------------------------------------------------------ main


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=None, help="seconds per measured run (default 10; 2 quick)")
    p.add_argument("--clients", type=int, default=2, help="load-generator processes")
    p.add_argument("--inflight", type=int, default=8, help="devices (connections) per load-generator process")
    p.add_argument("--km-workers", type=int, default=1, help="km worker processes")
    p.add_argument("--repeats", type=int, default=None, help="runs per configuration (default 3; 1 quick)")
    p.add_argument("--serve-hello", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tls", action="store_true", help=argparse.SUPPRESS)


async def main(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    quick = args.quick
    seconds = args.duration or (2.0 if quick else 10.0)
    repeats = args.repeats or (1 if quick else 3)
    inflight = 2 if quick and args.inflight == 8 else args.inflight
    info = machine_info()
    log("baseline (raw library rates)")
    before = measure_baseline(quick)
    runs: list[LoadRun] = []
    async with bench_deployment(args.km_workers) as bd:
        n = args.clients * inflight
        log(f"{n} devices: factory certificates through pm")
        devices = await make_devices(bd, n)
        cm = await start_cm(bd, http=False)
        hello = await start_hello(bd, tls=True)
        try:
            for rep in range(repeats):
                log(f"run {rep + 1}/{repeats}: hello over HTTPS with mutual TLS")
                runs.append(
                    await run_load(
                        bd,
                        what="aiohttp hello handler, HTTPS + mTLS (same TLS context)",
                        url=f"https://127.0.0.1:{hello.https_port}/hello",
                        devices=devices,
                        clients=args.clients,
                        seconds=seconds,
                        server_pid=hello.proc.pid,
                        check=False,
                    )
                )
                log(f"run {rep + 1}/{repeats}: EST simpleenroll through cm")
                runs.append(
                    await run_load(
                        bd,
                        what="EST simpleenroll through cm -> km (issued, recorded)",
                        url=f"https://127.0.0.1:{cm.https_port}/.well-known/est/simpleenroll",
                        devices=devices,
                        clients=args.clients,
                        seconds=seconds,
                        server_pid=cm.proc.pid,
                        check=True,
                    )
                )
        finally:
            cm.stop()
            hello.stop()
        recorded = bd.count_certificates(profile="operational")
    after = measure_baseline(quick)
    hello_rates = [r.rate for r in runs if r.what.startswith("aiohttp")]
    est_rates = [r.rate for r in runs if r.what.startswith("EST")]
    est_med = sorted(est_rates)[len(est_rates) // 2]
    hello_med = sorted(hello_rates)[len(hello_rates) // 2]
    errors = sum(r.errors for r in runs)
    first_error = next((r.first_error for r in runs if r.first_error), "")
    lines = [
        "## cm: EST simpleenroll through cm with mutual TLS",
        "",
        md_table(
            ["", ""], [[k, v] for k, v in info.items()] + [["run time", f"{time.perf_counter() - t_start:.0f} s"]]
        ),
        "",
        f"{args.clients} load-generator processes x {inflight} devices each (one kept-alive mTLS connection and "
        f"one request in flight per device), {seconds:g} s per run, {repeats} run(s) each, alternating; "
        f"{args.km_workers} km worker(s); cm is one process. Every EST response was parsed and matched to "
        f"its CSR's key. All on this {info['nproc']}-core machine: load generators, cm, km, nats-server.",
        "",
        md_table(RUN_HEADERS, run_rows(runs)),
        "",
        md_table(
            ["summary", "median responses/s"],
            [
                ["aiohttp hello (HTTPS + mTLS, one process)", rate(hello_med)],
                ["EST simpleenroll through cm", rate(est_med)],
                ["EST / hello", f"{est_med / hello_med:.1%}" if hello_med else "-"],
                ["operational certificates recorded by km during the runs", f"{recorded:,}"],
                ["failed requests (all runs)", f"{errors}" + (f" (first: {first_error[:120]})" if errors else "")],
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
                what=f"EST simpleenroll through cm, mTLS, {args.km_workers} km worker(s)",
                paper="-",
                target="-",
                measured=f"{rate(est_med)}/s (aiohttp hello, same TLS: {rate(hello_med)}/s)",
                verdict="-",
            )
        ],
    )


if __name__ == "__main__":
    if "--serve-hello" in sys.argv:
        p = argparse.ArgumentParser()
        _extra(p)
        p.add_argument("--quick", action="store_true")
        a = p.parse_args()
        assert a.data is not None
        serve_hello(a.serve_hello, a.data, a.tls)
    else:
        asyncio.run(main(parse_args(__doc__.splitlines()[0] if __doc__ else "cm EST bench", _extra)))
