"""A peer CA in the same run: cfssl's ``sign`` endpoint beside km's single-request issuance.

Issue 15's row "single-request issuance, 16 in flight / cfssl sign, 16 in flight" (target >= 1.0x).
cfssl is Debian's ``golang-cfssl`` (``/usr/bin/cfssl``; ``make bench-sysdeps`` installs it; it is no
dependency of iotdlm). Both sides get the same device CSRs (P-256, the device id as CN), sign with a
P-256 CA key and persist every certificate to SQLite in WAL mode:

- cfssl: ``cfssl serve`` with a P-256 CA, a default signing profile (client auth, one year) and a
  certdb (``-db-config``: driver ``sqlite3``, ``_journal_mode=WAL``; the tables are cfssl's own
  ``certdb/sqlite`` migration, created here). Requests are ``POST /api/v1/cfssl/sign`` with the CSR
  in PEM, over kept-alive HTTP/1.1 connections from an aiohttp client in this process.
- km: the bench deployment of ``common.py`` (real nats-server, 2 km worker processes, SQLite store
  under the deployment) and ``KmClient.issue`` (one certificate per request, signed request
  envelope, audit) from connections as pm, in this process.

Each side runs one request at a time, then 16 in flight (km: 2 connections x 8 loops; cfssl: 16
loops over a 16-connection pool), for the same seconds, alternating, after a warm-up. The
certificates each side stored are counted afterwards (cfssl's ``certificates`` table, km's store),
and the certdb's journal mode is read back to show WAL was in force. cfssl does less per
certificate (no signed request, no audit record, no device policy): the ratio is what a user
comparing rates sees, not like for like.

Run: ``.venv/bin/python bench/cfssl_peer.py [--quick] [--duration S]``. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common import (
    DTYPE,
    Headline,
    bench_deployment,
    csr_der,
    device_keys,
    emit,
    loadavg,
    log,
    machine_info,
    md_table,
    parse_args,
    rate,
)
from floors import single_request_ceiling
from iotdlm.bus.server import free_port
from iotdlm.errors import IotdlmError

PROFILE = "factory"
TARGET = 1.0
IN_FLIGHT = 16
#: cfssl's certdb/sqlite migration (001_CreateCertificates.sql) of the cfssl version Debian ships
CERTDB_SCHEMA = """
CREATE TABLE certificates (
  serial_number            blob NOT NULL,
  authority_key_identifier blob NOT NULL,
  ca_label                 blob,
  status                   blob NOT NULL,
  reason                   int,
  expiry                   timestamp,
  revoked_at               timestamp,
  pem                      blob NOT NULL,
  PRIMARY KEY(serial_number, authority_key_identifier)
);
CREATE TABLE ocsp_responses (
  serial_number            blob NOT NULL,
  authority_key_identifier blob NOT NULL,
  body                     blob NOT NULL,
  expiry                   timestamp,
  PRIMARY KEY(serial_number, authority_key_identifier),
  FOREIGN KEY(serial_number, authority_key_identifier) REFERENCES certificates(serial_number, authority_key_identifier)
);
"""


@dataclass
class Run:
    done: int = 0
    errors: int = 0
    first_error: str = ""
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0


async def drive(n: int, seconds: float, one: Callable[[int], Awaitable[None]]) -> Run:
    """``n`` loops, each awaiting ``one(i)`` then the next, for ``seconds`` (the last ones drained)."""
    run = Run()
    counter = iter(range(10**9))
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        while time.perf_counter() < deadline:
            try:
                await one(next(counter))
                run.done += 1
            except (IotdlmError, aiohttp.ClientError, RuntimeError) as exc:
                run.errors += 1
                run.first_error = run.first_error or str(exc)[:200]

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(n)))
    run.seconds = time.perf_counter() - start
    return run


# ------------------------------------------------------------------------------------------- cfssl


def _ca(folder: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cfssl bench CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    (folder / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "ca-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )


@contextlib.contextmanager
def cfssl_serve(cfssl: str, folder: Path) -> Iterator[tuple[str, Path]]:
    """``cfssl serve`` with a P-256 CA and a SQLite certdb in WAL mode; (base URL, certdb path)."""
    _ca(folder)
    db = folder / "certdb.sqlite"
    with sqlite3.connect(db) as conn:
        conn.executescript(CERTDB_SCHEMA)
        conn.execute("PRAGMA journal_mode=WAL")
    config = {"signing": {"default": {"expiry": "8760h", "usages": ["digital signature", "client auth"]}}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "db.json").write_text(json.dumps({"driver": "sqlite3", "data_source": f"file:{db}?_journal_mode=WAL"}))
    port = free_port()
    argv = [cfssl, "serve", "-address", "127.0.0.1", "-port", str(port), "-ca", "ca.pem", "-ca-key", "ca-key.pem"]
    argv += ["-config", "config.json", "-db-config", "db.json", "-loglevel", "4"]
    with (folder / "cfssl.log").open("wb") as out:
        proc = subprocess.Popen(argv, cwd=folder, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}", db
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def cfssl_sign(session: aiohttp.ClientSession, base: str, csr_pem: str) -> None:
    async with session.post(f"{base}/api/v1/cfssl/sign", json={"certificate_request": csr_pem}) as resp:
        body = await resp.json(content_type=None)
    if resp.status != 200 or not body.get("success") or "BEGIN CERTIFICATE" not in body["result"]["certificate"]:
        raise RuntimeError(f"cfssl sign: HTTP {resp.status}: {body.get('errors')}")


async def wait_ready(session: aiohttp.ClientSession, base: str, csr_pem: str, log_path: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            await cfssl_sign(session, base, csr_pem)
            return
        except (aiohttp.ClientError, RuntimeError) as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"cfssl serve does not sign: {exc}; its log: {log_path}") from exc
            await asyncio.sleep(0.1)


def cfssl_version(cfssl: str) -> str:
    return subprocess.run([cfssl, "version"], capture_output=True, text=True, check=False).stdout.split("\n")[0]


def stored_and_mode(db: Path) -> tuple[int, str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        count = conn.execute("SELECT count(*) FROM certificates").fetchone()[0]
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    return int(count), str(mode)


# ------------------------------------------------------------------------------------------- run


@dataclass
class Figures:
    km: dict[int, Run]
    cfssl: dict[int, Run]
    km_stored: int
    cfssl_stored: int
    journal: str
    cfssl_version: str


async def measure(args: argparse.Namespace, cfssl: str, seconds: float, repeats: int) -> Figures:
    n = 400 if args.quick else 4000
    log(f"cfssl peer: {n} device CSRs (not timed)")
    keys = device_keys(64)
    ders = [csr_der(keys[i % len(keys)], f"{DTYPE}-{i:07d}") for i in range(n)]
    pems = [x509.load_der_x509_csr(d).public_bytes(serialization.Encoding.PEM).decode() for d in ders]
    version = cfssl_version(cfssl)
    km: dict[int, Run] = {}
    peer: dict[int, Run] = {}
    with tempfile.TemporaryDirectory(prefix="iotdlm-bench-cfssl-") as tmp, cfssl_serve(cfssl, Path(tmp)) as (base, db):
        connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
        async with aiohttp.ClientSession(connector=connector) as session, bench_deployment(workers=2) as bd:
            await wait_ready(session, base, pems[0], Path(tmp) / "cfssl.log")
            clients = [await bd.pm_client() for _ in range(2)]
            km_before = bd.count_certificates()

            async def km_one(i: int) -> None:
                await clients[i % 2].issue(f"{DTYPE}-{i % n:07d}", PROFILE, csr=ders[i % n])

            async def cfssl_one(i: int) -> None:
                await cfssl_sign(session, base, pems[i % n])

            log("cfssl peer: warm-up")
            await drive(IN_FLIGHT, 0.3 if args.quick else 1.0, km_one)
            await drive(IN_FLIGHT, 0.3 if args.quick else 1.0, cfssl_one)
            for rep in range(repeats):
                for loops in (1, IN_FLIGHT):
                    for name, one, into in (("km", km_one, km), ("cfssl", cfssl_one, peer)):
                        log(f"cfssl peer: run {rep + 1}/{repeats}, {name}, {loops} in flight (load {loadavg()})")
                        r = await drive(loops, seconds, one)
                        best = into.get(loops)
                        if best is None or r.rate > best.rate:  # best of the repeats, each side alike
                            into[loops] = r
            km_stored = bd.count_certificates() - km_before
            for c in clients:
                await bd.close_bus(c.bus)
        cfssl_stored, journal = stored_and_mode(db)
    return Figures(km, peer, km_stored, cfssl_stored, journal, version)


def render(f: Figures, seconds: float, repeats: int, quick: bool) -> tuple[str, list[Headline]]:
    info = machine_info()
    load = loadavg()
    rows = []
    for loops in (1, IN_FLIGHT):
        k, c = f.km[loops], f.cfssl[loops]
        rows.append(
            [
                "one at a time" if loops == 1 else f"{loops} in flight",
                f"{rate(k.rate)} ({k.errors} errors)",
                f"{rate(c.rate)} ({c.errors} errors)",
                f"{k.rate / c.rate:.2f}x" if c.rate else "-",
            ]
        )
    ratio16 = f.km[IN_FLIGHT].rate / f.cfssl[IN_FLIGHT].rate if f.cfssl[IN_FLIGHT].rate else 0.0
    ratio1 = f.km[1].rate / f.cfssl[1].rate if f.cfssl[1].rate else 0.0
    verdict = "met" if ratio16 >= TARGET else "missed"
    errors = [r.first_error for r in (*f.km.values(), *f.cfssl.values()) if r.first_error]
    lines = [
        "## km beside cfssl: single-request issuance, same run",
        "",
        f"{seconds:g} s per run, {repeats} run(s) each side, alternating, best run shown; load average {load}. "
        f"Machine: {info['cpu']}, {info['nproc']} CPU(s); commit {info['iotdlm commit']}. cfssl: {f.cfssl_version} "
        f"(Debian golang-cfssl), certdb SQLite, journal mode read back: `{f.journal}`. km: 2 worker processes, "
        "real nats-server, SQLite store, `KmClient.issue` from 2 pm connections. Same P-256 device CSRs both sides.",
        "",
        md_table(["requests", "km certificates/s", "cfssl sign certificates/s", "km / cfssl"], rows),
        "",
        f"- Persisted during the runs (warm-up included): km {f.km_stored:,} certificates in its store, cfssl "
        f"{f.cfssl_stored:,} rows in its certdb.",
        "- cfssl does less per certificate: no signed request to verify, no audit record, no device policy or "
        "re-enrollment lookup; the ratio is what a user comparing rates sees.",
        f"- 16 in flight: km / cfssl **{ratio16:.2f}x**, target >= {TARGET:.1f}x: **{verdict}**.",
    ]
    if errors:
        lines.append(f"- **Errors**; first: {errors[0]}")
    if quick:
        lines.insert(2, "**--quick: a smoke run, not figures.**\n")
    heads = [
        Headline(
            what="single-request issuance, 16 in flight / cfssl sign, 16 in flight",
            paper="-",
            target=f">= {TARGET:.1f}x",
            measured=f"{rate(f.km[IN_FLIGHT].rate)} vs {rate(f.cfssl[IN_FLIGHT].rate)} certificates/s",
            verdict=verdict,
            yardstick=f"cfssl sign, 16 in flight, SQLite certdb ({f.journal})",
            ratio=round(ratio16, 3),
            load=load,
        ),
        Headline(
            what="single-request issuance, one at a time / cfssl sign, one at a time",
            paper="-",
            target="-",
            measured=f"{rate(f.km[1].rate)} vs {rate(f.cfssl[1].rate)} certificates/s",
            verdict="-",
            yardstick=f"cfssl sign, one at a time, SQLite certdb ({f.journal})",
            ratio=round(ratio1, 3),
            load=load,
        ),
    ]
    return "\n".join(lines), heads


def main() -> None:
    def extra(p: argparse.ArgumentParser) -> None:
        p.add_argument("--duration", type=float, default=None, help="seconds per run (default 5; 1 with --quick)")
        p.add_argument("--repeats", type=int, default=None, help="runs per side and setting (default 2; 1 quick)")
        p.add_argument("--cfssl", default=shutil.which("cfssl"), help="the cfssl binary (default: PATH)")

    args = parse_args((__doc__ or "").splitlines()[0], extra)
    if not args.cfssl:
        raise SystemExit("cfssl is not installed: `make bench-sysdeps` (Debian: apt-get install golang-cfssl)")
    seconds = args.duration or (1.0 if args.quick else 5.0)
    repeats = args.repeats or (1 if args.quick else 2)
    figures = asyncio.run(measure(args, args.cfssl, seconds, repeats))
    section, heads = render(figures, seconds, repeats, args.quick)
    ceiling_rate, how = single_request_ceiling(args.quick)  # same run, after the load
    peer = figures.cfssl[IN_FLIGHT].rate
    if peer:
        best = round(ceiling_rate / peer, 2)  # as shown, so the verdict agrees with the figure
        verdict = "reachable in principle" if best >= TARGET else "out of reach: the parts alone miss it"
        section += (
            f"\n- Ceiling (bench/floors.py, same run): if only the signatures, the CSR check, build + sign, the NATS "
            f"round trip and the SQLite rows cost CPU, km could issue {rate(ceiling_rate)} certificates/s here "
            f"({how}): **{best:.2f}x** of cfssl's 16 in flight, {verdict}."
        )
        heads.append(
            Headline(
                what="ceiling: single-request issuance, 16 in flight / cfssl sign",
                paper="-",
                target=f">= {TARGET:.1f}x",
                measured=f"{best:.2f}x ({rate(ceiling_rate)}/s at most: {how})",
                verdict=verdict,
                yardstick="the parts the design cannot skip",
                ratio=best,
                load=loadavg(),
            )
        )
    emit(section, args, heads)


if __name__ == "__main__":
    main()
