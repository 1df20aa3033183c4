"""CRL generation by km's validation authority for 100k and 1M revoked certificates: time, size
and memory per partition, against cryptography's CRL builder on the same number of entries.

Target: 1M revoked certificates in <= 30 s across the 64 partitions of one issuing CA, each
partition's DER <= 1 MiB, memory bounded (it must not grow with the number of revocations).

Population: issuing 1M real certificates takes too long, so synthetic ``CertRecord`` rows are
inserted through the store's own API, ``Store.add_certificates``, in batches of 20,000 (one
transaction each). ``add_certificates`` takes records that are already revoked (``status`` =
``revoked`` with ``revoked_at`` and ``revocation_reason``), so no revocation pass is needed. DER
and fingerprint are fake but unique (as ``tests/fixtures_store.py`` ``make_cert`` does; CRL
generation reads only serial, revocation time and reason), serials are 159-bit random (20 DER
octets, the longest ``x509.random_serial_number`` gives), ``crl_partition`` = serial % 64, issuer
``operational``, ``not_after`` ten years ahead, revoked between 1 and 365 days ago, every entry
with a reason code (keyCompromise, superseded, cessationOfOperation, affiliationChanged: the
largest entries, 53 bytes). The populated SQLite file is cached in ``bench/out/`` (git-ignored),
keyed by the row count and the schema, and copied into a fresh deployment for every run.

Measured, each in its own process (spawn) so its peak RSS is its own:

- ``Va.generate_crl`` for every partition, one process (``--repeats`` times), and the partitions
  split over 2 processes (each with its own Store and Va): total seconds, per-partition p50/max,
  entries, DER size, peak RSS (``ru_maxrss``) and its growth over the process before generating;
- tracemalloc peak of ``generate_crl`` per partition (a subset of partitions; tracemalloc slows
  Python down, so this pass is not timed), against holding every revoked row of the issuer at once;
- one delta CRL after 100 fresh revocations (``Va.revoke``, which also regenerates the
  partition's delta each time) on top of the full CRLs;
- the CRLs km then serves over NATS (``KmClient.crl`` as ``cm``; a real nats-server and a km
  worker process on the same deployment), checked against the CA;
- a cProfile of one partition of the largest set;
- raw baseline: cryptography's ``CertificateRevocationListBuilder`` on the same number of entries,
  built the fast way ``pki/crl.py`` does (``RevokedCertificateBuilder`` per entry, the list handed
  to the builder's constructor once), signed with P-256 and DER-encoded; and ECDSA P-256 signatures/s.

Every generated CRL is parsed back and checked: signature by the CA, entry count equal to the
store's count, the partition's issuingDistributionPoint, reasons present.

Run: ``.venv/bin/python bench/va_crl.py [--quick] [--sizes 100000 1000000] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import datetime as dt
import hashlib
import io
import json
import multiprocessing as mp
import os
import pstats
import random
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common import (
    DTYPE,
    ORGANIZATION,
    REPO,
    BenchDeployment,
    Headline,
    Summary,
    emit,
    load_client_context,
    loadavg,
    log,
    md_table,
    parse_args,
    percentile,
    rate,
    raw_sign_rate,
)
from iotdlm.bus.server import free_port
from iotdlm.client.km import KmClient
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment, init_deployment
from iotdlm.pki.keys import Algorithm
from iotdlm.runtime import build_km, connect_identity, km_trust, nats_server, open_store, sealer_for
from iotdlm.store import CertRecord, Store, fingerprint_of

ISSUER = "operational"
PARTITIONS = 64
TARGET_SECONDS = 30.0
SIZE_LIMIT = 1 << 20
REASONS = ("keyCompromise", "superseded", "cessationOfOperation", "affiliationChanged")
POPULATE_BATCH = 20_000
OUT = REPO / "bench" / "out"
DELTA_REVOCATIONS = 100
DELTA_PARTITION = 7


def _rss_now() -> int:
    """Resident set size of this process now, bytes."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _rss_peak() -> int:
    """Peak resident set size of this process so far, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f}"


# ------------------------------------------------------------------------------------ population


def _schema_tag() -> str:
    """Changes when the store's schema or migrations change (then the cache is rebuilt)."""
    import iotdlm.store as st

    base = Path(st.__file__).resolve().parent
    h = hashlib.sha256((base / "tables.py").read_bytes())
    for p in sorted((base / "migrations" / "versions").glob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:10]


def cache_path(n: int) -> Path:
    return OUT / f"va_crl-{n}-{_schema_tag()}.db"


def populate(path: Path, n: int, seed: int = 1) -> float:
    """Insert ``n`` revoked synthetic certificates of ``ISSUER`` through ``Store.add_certificates``."""
    tmp = path.with_suffix(".partial")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    t0 = time.perf_counter()
    store = Store.open(f"sqlite:///{tmp}", migrate=True)
    rng = random.Random(seed)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    not_after = now + dt.timedelta(days=3650)
    year = 365 * 86400
    try:
        for start in range(0, n, POPULATE_BATCH):
            recs = []
            for i in range(start, min(n, start + POPULATE_BATCH)):
                serial = rng.getrandbits(159) | (1 << 158)  # 20 DER octets, the worst case
                der = b"\x30\x82fake-cert|" + ISSUER.encode() + b"|" + serial.to_bytes(21, "big")
                revoked_at = now - dt.timedelta(seconds=rng.randrange(86400, year))
                recs.append(
                    CertRecord(
                        serial=serial,
                        issuer=ISSUER,
                        subject=f"CN=dev-{i:07d}",
                        device_id=None,
                        profile="operational",
                        not_before=revoked_at - dt.timedelta(days=30),
                        not_after=not_after,
                        status="revoked",
                        der=der,
                        fingerprint=fingerprint_of(der),
                        requested_by="bench",
                        created_at=revoked_at - dt.timedelta(days=30),
                        revoked_at=revoked_at,
                        revocation_reason=REASONS[i % len(REASONS)],
                        crl_partition=serial % PARTITIONS,
                    )
                )
            store.add_certificates(recs)
            if (start // POPULATE_BATCH) % 10 == 0:
                log(f"crl: populated {start + len(recs):,} / {n:,} ({time.perf_counter() - t0:.0f} s)")
    finally:
        store.close()
    took = time.perf_counter() - t0
    tmp.replace(path)
    path.with_suffix(".json").write_text(
        json.dumps({"rows": n, "populate_seconds": took, "made": now.isoformat(), "schema": _schema_tag()})
    )
    return took


def _populate_child(path: str, n: int, conn: Connection) -> None:
    conn.send(populate(Path(path), n))
    conn.close()


def ensure_population(n: int) -> tuple[Path, float, bool]:
    """The cached database with ``n`` revoked certificates (made now, in a child process, if
    missing). Returns (path, seconds the population took, whether it was made in this run)."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = cache_path(n)
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        return path, float(json.loads(meta.read_text())["populate_seconds"]), False
    log(f"crl: populating {n:,} revoked certificates into {path} (cached for later runs)")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_populate_child, args=(str(path), n, child))
    p.start()
    child.close()
    took = parent.recv()
    p.join()
    log(f"crl: populated {n:,} in {took:.1f} s")
    return path, took, True


# ------------------------------------------------------------------------------------ deployment


@dataclass
class Site:
    root: Path
    dep: Deployment
    passphrase: str
    tmp: Path


def make_site(db: Path) -> Site:
    """A fresh deployment (P-256) whose SQLite store is a copy of the cached population."""
    tmp = Path(tempfile.mkdtemp(prefix="iotdlm-bench-crl-"))
    root = tmp / "data"
    passphrase = os.urandom(16).hex()
    dep, _ = init_deployment(
        root,
        organization=ORGANIZATION,
        algorithm=Algorithm.P256,
        dtypes=[DTYPE],
        passphrase=passphrase.encode(),
        nats_port=free_port(),
        now=dt.datetime.now(dt.UTC),
    )
    target = Path(dep.database_url.removeprefix("sqlite:///"))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(db, target)
    store = open_store(dep)  # brings the schema up to date if needed; records nothing
    store.close()
    return Site(root=root, dep=dep, passphrase=passphrase, tmp=tmp)


# ------------------------------------------------------------------------------------ worker processes


@dataclass(frozen=True)
class Job:
    root: str
    passphrase: str
    partitions: list[int]
    kind: str  # "generate", "tracemalloc", "all-rows", "profile"


def job_process(job: Job, conn: Connection) -> None:
    try:
        conn.send(_job(job, conn))
    except BaseException as exc:
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        conn.close()


def _job(job: Job, conn: Connection) -> dict[str, Any]:
    dep = Deployment.load(job.root)
    store = open_store(dep, migrate=False)
    km = build_km(dep, store, SystemClock(), passphrase=job.passphrase.encode())
    va = km.va
    assert va is not None
    now = dt.datetime.now(dt.UTC)
    # warm what is lazily made (statement cache, CA objects) on an empty partition of another CA
    va.generate_crl("factory", 0)
    conn.send("ready")
    start_at = conn.recv()
    time.sleep(max(0.0, start_at - time.time()))
    rss0 = _rss_now()
    out: dict[str, Any] = {"rss_before": rss0, "peak_before": _rss_peak()}
    if job.kind == "generate":
        times, sizes = [], []
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        for p in job.partitions:
            t = time.perf_counter()
            rec = va.generate_crl(ISSUER, p)
            times.append(time.perf_counter() - t)
            sizes.append(len(rec.der))
        out.update(
            seconds=time.perf_counter() - t0,
            cpu=time.process_time() - cpu0,
            times=times,
            sizes=sizes,
            peak=_rss_peak(),
            rss_after=_rss_now(),
        )
    elif job.kind == "tracemalloc":
        peaks = []
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for p in job.partitions:
            tracemalloc.reset_peak()
            va.generate_crl(ISSUER, p)
            peaks.append(tracemalloc.get_traced_memory()[1] - base)
        out.update(peaks=peaks, retained=tracemalloc.get_traced_memory()[0] - base)
        tracemalloc.stop()
    elif job.kind == "all-rows":
        # first without tracemalloc (time, RSS), then again under tracemalloc (Python allocations)
        t0 = time.perf_counter()
        rows = [row for p in job.partitions for row in store.iter_revoked(ISSUER, p, not_after_from=now)]
        out.update(seconds=time.perf_counter() - t0, rows=len(rows), peak=_rss_peak(), rss_after=_rss_now())
        del rows
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        rows = [row for p in job.partitions for row in store.iter_revoked(ISSUER, p, not_after_from=now)]
        out.update(traced_peak=tracemalloc.get_traced_memory()[1] - base)
        tracemalloc.stop()
        del rows
    elif job.kind == "profile":
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        rec = va.generate_crl(ISSUER, job.partitions[0])
        prof.disable()
        out.update(seconds=time.perf_counter() - t0, size=len(rec.der), profile=_profile_rows(prof))
    store.close()
    return out


def _is(file_suffix: str, *funcs: str) -> Any:
    return lambda filename, func: filename.endswith(file_suffix) and func in funcs


#: (what, predicate on cProfile's (filename, function)); cumulative times. Row order is nesting
#: order: build_crl pulls the rows (``sorted`` consumes the generator), so the store's iteration
#: is part of it.
PROFILE_ROWS: list[tuple[str, Any]] = [
    ("`Va.generate_crl` (all of it)", _is("km/va.py", "generate_crl")),
    ("-- `Store.next_crl_number` (write transaction)", _is("store/revocation.py", "next_crl_number")),
    ("-- `pki.crl.build_crl` (pulls the rows, builds entries, signs)", _is("pki/crl.py", "build_crl")),
    ("---- `Store._iter_revoked`: SQLAlchemy queries + row processing", _is("store/revocation.py", "_iter_revoked")),
    (
        "------ `UTCDateTime.process_result_value` (revoked_at, per row)",
        _is("store/tables.py", "process_result_value"),
    ),
    (
        "---- `RevokedCertificateBuilder`: serial_number, revocation_date, add_extension, build",
        _is("cryptography/x509/base.py", "serial_number", "revocation_date", "add_extension", "build"),
    ),
    ("---- `_utc` per entry", _is("pki/crl.py", "_utc")),
    ("---- `_crl_extension_reason` per entry", _is("pki/crl.py", "_crl_extension_reason")),
    ("---- `Signer.sign_crl`: encode + ECDSA (cryptography)", _is("pki/keys.py", "sign_crl")),
    (
        "-- `CertificateRevocationList.public_bytes` (DER)",
        lambda filename, func: "public_bytes" in func and "CertificateRevocationList" in func,
    ),
    ("-- `Store.save_crl` (write transaction with the DER)", _is("store/revocation.py", "save_crl")),
]


def _profile_rows(prof: cProfile.Profile) -> list[tuple[str, float, float]]:
    stats = pstats.Stats(prof, stream=io.StringIO())
    raw: Any = stats.stats  # type: ignore[attr-defined]
    sums = [0.0] * len(PROFILE_ROWS)
    for (filename, _line, func), (_cc, _nc, _tt, ct, _callers) in raw.items():
        for i, (_what, hit) in enumerate(PROFILE_ROWS):
            if hit(filename, func):
                sums[i] += ct
    total = sums[0]
    return [(what, s, s / total if total else 0.0) for (what, _), s in zip(PROFILE_ROWS, sums, strict=True)]


def run_jobs(jobs: list[Job]) -> list[dict[str, Any]]:
    """Start one process per job, wait until all are ready, start them together, collect results."""
    ctx = load_client_context()
    procs, conns = [], []
    for job in jobs:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=job_process, args=(job, child))
        p.start()
        child.close()
        procs.append(p)
        conns.append(parent)
    for c in conns:
        got = c.recv()
        if got != "ready":
            raise RuntimeError(f"CRL worker failed before starting: {got}")
    start_at = time.time() + 0.2
    for c in conns:
        c.send(start_at)
    time.sleep(max(0.0, start_at - time.time()))
    sys0 = system_cpu()
    out = [c.recv() for c in conns]
    sys1 = system_cpu()
    wall = time.time() - start_at
    for p in procs:
        p.join(60)
    for r in out:
        if "error" in r:
            raise RuntimeError(f"CRL worker failed: {r['error']}")
    ours = sum(r.get("cpu", 0.0) for r in out)
    for r in out:
        r["others"] = max(0.0, sys1 - sys0 - ours) / wall if "cpu" in r else float("nan")
    return out


def system_cpu() -> float:
    """CPU seconds used so far by the whole machine (all CPUs, every process), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------ checks


@dataclass
class Check:
    crls: int = 0
    entries: int = 0
    bad: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)


def check_crls(site: Site) -> Check:
    """Parse every stored full CRL of ISSUER; check signature, count, IDP, reasons."""
    ca = site.dep.ca_certificate(ISSUER)
    pub = ca.public_key()
    urls = site.dep.public_urls
    store = open_store(site.dep, migrate=False)
    now = dt.datetime.now(dt.UTC)
    chk = Check()
    try:
        for p in range(PARTITIONS):
            rec = store.get_crl(ISSUER, p, "full")
            if rec is None:
                chk.bad.append(f"partition {p}: no CRL stored")
                continue
            crl = x509.load_der_x509_crl(rec.der)
            want = store.count_revoked(ISSUER, p, not_after_from=now)
            problems = []
            if not crl.is_signature_valid(pub):  # type: ignore[arg-type]
                problems.append("bad signature")
            if len(crl) != want:
                problems.append(f"{len(crl)} entries, the store has {want}")
            idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
            if [g.value for g in idp.full_name or []] != [urls.crl(ISSUER, p)]:
                problems.append("wrong issuingDistributionPoint")
            if len(rec.der) > SIZE_LIMIT:
                problems.append(f"{len(rec.der):,} bytes > 1 MiB")
            first = next(iter(crl), None)
            if first is not None and not any(isinstance(e.value, x509.CRLReason) for e in first.extensions):
                problems.append("entry without its reason code")
            if problems:
                chk.bad.append(f"partition {p}: {', '.join(problems)}")
            chk.crls += 1
            chk.entries += len(crl)
            chk.counts.append(len(crl))
            chk.sizes.append(len(rec.der))
    finally:
        store.close()
    return chk


# ------------------------------------------------------------------------------------ delta + serving


@dataclass
class DeltaResult:
    revoke_times: list[float]
    delta_seconds: float
    delta_entries: int
    delta_bytes: int
    base_number: int
    ok: bool
    note: str


def delta_after_revocations(site: Site) -> DeltaResult:
    """Insert 100 valid certificates in one partition, revoke each with ``Va.revoke`` (which also
    regenerates that partition's delta CRL), then time one more delta CRL of that partition."""
    store = open_store(site.dep, migrate=False)
    try:
        km = build_km(site.dep, store, SystemClock(), passphrase=site.passphrase.encode())
        va = km.va
        assert va is not None
        now = dt.datetime.now(dt.UTC)
        rng = random.Random(os.urandom(8))
        recs = []
        while len(recs) < DELTA_REVOCATIONS:
            serial = rng.getrandbits(159) | (1 << 158)
            if serial % PARTITIONS != DELTA_PARTITION:
                continue
            der = b"\x30\x82fresh-cert|" + serial.to_bytes(21, "big")
            recs.append(
                CertRecord(
                    serial=serial,
                    issuer=ISSUER,
                    subject=f"CN=fresh-{len(recs)}",
                    device_id=None,
                    profile="operational",
                    not_before=now,
                    not_after=now + dt.timedelta(days=365),
                    status="valid",
                    der=der,
                    fingerprint=fingerprint_of(der),
                    requested_by="bench",
                    created_at=now,
                    crl_partition=DELTA_PARTITION,
                )
            )
        store.add_certificates(recs)
        times = []
        for rec in recs:
            t = time.perf_counter()
            va.revoke(rec.serial, issuer=ISSUER, reason="keyCompromise", actor="bench")
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        delta = va.generate_crl(ISSUER, DELTA_PARTITION, delta=True)
        took = time.perf_counter() - t
        crl = x509.load_der_x509_crl(delta.der)
        fresh = {r.serial for r in recs}
        listed = {e.serial_number for e in crl}
        ind = crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator).value.crl_number
        ok = (
            fresh <= listed
            and crl.is_signature_valid(site.dep.ca_certificate(ISSUER).public_key())  # type: ignore[arg-type]
            and delta.base_number == ind
        )
        extra = len(listed - fresh)
        note = f"all {len(fresh)} fresh revocations listed" if fresh <= listed else "fresh revocations missing"
        if extra:
            note += f", plus {extra} older ones"
        return DeltaResult(times, took, len(crl), len(delta.der), ind, ok, note)
    finally:
        store.close()


@dataclass
class Served:
    times: list[float]
    sizes: list[int]
    same: bool
    note: str = ""


async def serve_over_nats(site: Site, partitions: list[int]) -> Served:
    """Start the deployment's nats-server and one km worker; fetch CRLs as ``cm`` (``KmClient.crl``)."""
    server = nats_server(site.dep)
    server.start()
    bd = BenchDeployment(root=site.root, dep=site.dep, passphrase=site.passphrase, server=server)
    try:
        await bd.set_workers(1, wait=300)
        bus, ident = await connect_identity(site.dep, "cm")
        bd.buses.append(bus)
        cm = KmClient(bus, sealer_for(ident), bd.clock, timeout=60, trust=km_trust(bd.dep))
        store = open_store(site.dep, migrate=False)
        times, sizes, same = [], [], True
        try:
            for p in partitions:
                t = time.perf_counter()
                der = await cm.crl(ISSUER, p)
                times.append(time.perf_counter() - t)
                sizes.append(len(der))
                stored = store.get_crl(ISSUER, p, "full")
                same = same and stored is not None and stored.der == der
        finally:
            store.close()
        return Served(times, sizes, same)
    finally:
        for b in list(bd.buses):
            await bd.close_bus(b)
        for w in bd.workers:
            if w.proc.poll() is None:
                w.proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    w.proc.wait(timeout=15)
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
        server.stop()


# ------------------------------------------------------------------------------------ raw baseline


def raw_crl_seconds(entries: int) -> tuple[float, int]:
    """Seconds for cryptography to build, sign (P-256) and DER-encode one CRL of ``entries``
    entries with reason codes, the way pki/crl.py builds it; and the DER size."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "baseline CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    rng = random.Random(2)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    rows = [
        (
            rng.getrandbits(159) | (1 << 158),
            now - dt.timedelta(seconds=rng.randrange(86400, 365 * 86400)),
            x509.CRLReason(x509.ReasonFlags.key_compromise),
        )
        for _ in range(entries)
    ]
    rows.sort(key=lambda r: r[0])
    url = "http://127.0.0.1:8080/crl/operational-7.crl"
    t0 = time.perf_counter()
    revoked = [
        x509.RevokedCertificateBuilder()
        .serial_number(s)
        .revocation_date(at)
        .add_extension(reason, critical=False)
        .build()
        for s, at, reason in rows
    ]
    builder = (
        x509.CertificateRevocationListBuilder(revoked_certificates=revoked)
        .issuer_name(name)
        .last_update(now)
        .next_update(now + dt.timedelta(days=1))
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .add_extension(
            x509.IssuingDistributionPoint(
                full_name=[x509.UniformResourceIdentifier(url)],
                relative_name=None,
                only_contains_user_certs=True,
                only_contains_ca_certs=False,
                only_some_reasons=None,
                indirect_crl=False,
                only_contains_attribute_certs=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.FreshestCRL(
                [
                    x509.DistributionPoint(
                        full_name=[x509.UniformResourceIdentifier(url.replace(".crl", ".delta"))],
                        relative_name=None,
                        reasons=None,
                        crl_issuer=None,
                    )
                ]
            ),
            critical=False,
        )
    )
    der = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    return time.perf_counter() - t0, len(der)


@dataclass(frozen=True)
class RawCrl:
    entries: int
    seconds: Summary
    size: int
    sign: Summary


def measure_raw(entries: int, quick: bool) -> RawCrl:
    repeats = 1 if quick else 5
    runs = [raw_crl_seconds(entries) for _ in range(repeats)]
    sign = [raw_sign_rate(0.15 if quick else 0.5) for _ in range(1 if quick else 3)]
    return RawCrl(entries, Summary.of([r[0] for r in runs]), runs[0][1], Summary.of(sign))


# ------------------------------------------------------------------------------------ one size


@dataclass
class GenRun:
    procs: int
    seconds: float  # wall time, all partitions
    cpu: float
    times: list[float]
    sizes: list[int]
    peaks: list[int]  # ru_maxrss of each process
    others: float  # cores used meanwhile by processes that are not part of the benchmark
    growth: list[int]  # peak minus RSS before generating, per process


@dataclass
class SizeResult:
    n: int
    db_path: Path
    populate_seconds: float
    populated_now: bool
    db_bytes: int
    runs: list[GenRun]
    check: Check
    traced: dict[str, Any]
    all_rows: dict[str, Any]
    raw: RawCrl
    delta: DeltaResult | None = None
    served: Served | None = None
    profile: dict[str, Any] | None = None


def _gen(site: Site, procs: int) -> GenRun:
    parts = [list(range(i, PARTITIONS, procs)) for i in range(procs)]
    res = run_jobs([Job(str(site.root), site.passphrase, ps, "generate") for ps in parts])
    times = [0.0] * PARTITIONS
    sizes = [0] * PARTITIONS
    for ps, r in zip(parts, res, strict=True):
        for p, t, sz in zip(ps, r["times"], r["sizes"], strict=True):
            times[p] = t
            sizes[p] = sz
    return GenRun(
        procs=procs,
        seconds=max(r["seconds"] for r in res),
        cpu=sum(r["cpu"] for r in res),
        times=times,
        sizes=sizes,
        peaks=[r["peak"] for r in res],
        growth=[r["peak"] - r["rss_before"] for r in res],
        others=res[0]["others"],
    )


async def run_size(n: int, args: argparse.Namespace, *, last: bool) -> SizeResult:
    quick = args.quick
    db, pop_s, now = ensure_population(n)
    site = make_site(db)
    try:
        runs: list[GenRun] = []
        for rep in range(args.repeats):
            log(f"crl: {n:,}: 1 process, all {PARTITIONS} partitions, run {rep + 1}/{args.repeats} (load {loadavg()})")
            runs.append(_gen(site, 1))
            log(f"crl: -> {runs[-1].seconds:.1f} s")
        for rep in range(args.repeats):
            log(f"crl: {n:,}: 2 processes, run {rep + 1}/{args.repeats} (load {loadavg()})")
            runs.append(_gen(site, 2))
            log(f"crl: -> {runs[-1].seconds:.1f} s")
        check = check_crls(site)
        sub = list(range(0, PARTITIONS, max(1, PARTITIONS // args.traced_partitions)))[: args.traced_partitions]
        log(f"crl: {n:,}: tracemalloc over {len(sub)} partitions; all rows at once")
        (traced,) = run_jobs([Job(str(site.root), site.passphrase, sub, "tracemalloc")])
        (all_rows,) = run_jobs([Job(str(site.root), site.passphrase, list(range(PARTITIONS)), "all-rows")])
        counts = sorted(check.counts)
        raw = measure_raw(counts[len(counts) // 2] if counts else n // PARTITIONS, quick)
        res = SizeResult(
            n=n,
            db_path=db,
            populate_seconds=pop_s,
            populated_now=now,
            db_bytes=db.stat().st_size,
            runs=runs,
            check=check,
            traced=traced,
            all_rows=all_rows,
            raw=raw,
        )
        if last:
            log(f"crl: {n:,}: cProfile of one partition")
            (prof,) = run_jobs([Job(str(site.root), site.passphrase, [3], "profile")])
            res.profile = prof
            log(f"crl: {n:,}: delta CRL after {DELTA_REVOCATIONS} fresh revocations")
            res.delta = delta_after_revocations(site)
            log(f"crl: {n:,}: CRLs served over NATS by a km worker")
            res.served = await serve_over_nats(site, [DELTA_PARTITION, 0, 1, 2, 3, 4, 5, 6, 8, 9])
        return res
    finally:
        shutil.rmtree(site.tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------ report


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=int, nargs="+", help="revoked certificates (default 100000 1000000; --quick 20000)")
    p.add_argument("--repeats", type=int, help="full generations per configuration (default 3, --quick 1)")
    p.add_argument("--traced-partitions", type=int, default=8, help="partitions in the tracemalloc pass (default 8)")


def _spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def render(
    results: list[SizeResult], args: argparse.Namespace, signs: tuple[Summary, Summary], took: float
) -> tuple[str, list[Headline]]:
    gen_rows = []
    heads: list[Headline] = []
    notes: list[str] = []
    if args.quick:
        notes.append("- **--quick run: a smoke test, not figures.**")
    for r in results:
        for procs in (1, 2):
            runs = [g for g in r.runs if g.procs == procs]
            if not runs:
                continue
            secs = [g.seconds for g in runs]
            med = sorted(runs, key=lambda g: g.seconds)[len(runs) // 2]
            verdict = "-"
            if r.n >= 1_000_000:
                verdict = "**met**" if statistics.median(secs) <= TARGET_SECONDS else "missed"
            gen_rows.append(
                [
                    f"{r.n:,}",
                    procs,
                    len(runs),
                    f"**{_spread(secs, '{:.1f}')}**",
                    f"{statistics.median(g.cpu for g in runs):.1f}",
                    f"{percentile(med.times, 50) * 1000:.0f}",
                    f"{max(med.times) * 1000:.0f}",
                    f"{r.n / statistics.median(secs):,.0f}",
                    f"{min(r.check.counts):,} / {statistics.median(r.check.counts):,.0f} / {max(r.check.counts):,}",
                    f"{max(med.sizes):,}",
                    f"{sum(med.sizes) / 1e6:.1f}",
                    " + ".join(mib(x) for x in med.peaks),
                    " + ".join(mib(x) for x in med.growth),
                    f"{statistics.median(g.others for g in runs):.2f}",
                    verdict,
                ]
            )
    gen_table = md_table(
        [
            "revoked",
            "processes",
            "runs",
            "total s median (min-max)",
            "CPU s",
            "per partition p50 ms",
            "max ms",
            "entries/s",
            "entries per partition min / median / max",
            "largest DER bytes",
            "all 64 MB",
            "peak RSS MiB (per process)",
            "RSS growth while generating MiB",
            "other tenants' cores",
            f"target <= {TARGET_SECONDS:.0f} s (1M)",
        ],
        gen_rows,
    )
    mem_rows = []
    for r in results:
        tp = r.traced["peaks"]
        one = [g for g in r.runs if g.procs == 1]
        med = sorted(one, key=lambda g: g.seconds)[len(one) // 2]
        mem_rows.append(
            [
                f"{r.n:,}",
                f"`Va.generate_crl`, partition after partition (tracemalloc: {len(tp)} partitions; RSS: all 64)",
                f"{mib(max(tp))} per partition (first {mib(tp[0])}, last {mib(tp[-1])}); "
                f"{mib(r.traced['retained'])} retained after",
                f"{mib(med.peaks[0])} (+{mib(med.growth[0])})",
            ]
        )
        a = r.all_rows
        mem_rows.append(
            [
                f"{r.n:,}",
                f"every revoked row of the issuer held at once ({a['rows']:,} rows from `iter_revoked`, "
                f"loaded in {a['seconds']:.1f} s)",
                mib(a["traced_peak"]),
                f"{mib(a['peak'])} (+{mib(a['peak'] - a['rss_before'])})",
            ]
        )
    mem_table = md_table(["revoked", "what", "tracemalloc peak MiB", "peak RSS MiB (+ growth)"], mem_rows)
    raw_rows = []
    for r in results:
        one = [g for g in r.runs if g.procs == 1]
        med = sorted(one, key=lambda g: g.seconds)[len(one) // 2]
        raw_rows.append(
            [
                f"{r.n:,}",
                f"{r.raw.entries:,}",
                f"{r.raw.seconds.p50 * 1000:.0f} ({r.raw.seconds.min * 1000:.0f}-{r.raw.seconds.max * 1000:.0f})",
                f"{r.raw.size:,}",
                f"{r.raw.seconds.p50 * PARTITIONS:.1f}",
                f"{percentile(med.times, 50) * 1000:.0f}",
                f"{percentile(med.times, 50) / r.raw.seconds.p50:.1f}x",
            ]
        )
    raw_table = md_table(
        [
            "revoked",
            "entries (median partition)",
            "cryptography build+sign+DER ms median (min-max)",
            "DER bytes",
            "x 64 partitions s",
            "km `generate_crl` p50 ms",
            "km / raw",
        ],
        raw_rows,
    )
    sign_table = md_table(
        ["raw library baseline (one thread, this run)", "unit", "min", "median", "max"],
        [
            [f"{when}: ECDSA P-256 `key.sign`", "signatures/s", rate(x.min), rate(x.p50), rate(x.max)]
            for when, x in zip(("start of run", "end of run"), signs, strict=True)
        ],
    )
    pop_rows = [
        [
            f"{r.n:,}",
            f"{r.populate_seconds:.1f}",
            "now" if r.populated_now else "earlier run (cached)",
            f"{r.n / r.populate_seconds:,.0f}",
            f"{r.db_bytes / 1e6:.0f}",
            f"`bench/out/{r.db_path.name}`",
        ]
        for r in results
    ]
    pop_table = md_table(["revoked", "population s", "populated", "rows/s", "SQLite MB", "cached file"], pop_rows)

    notes.append(
        "- `CPU s`: CPU seconds of the generating process(es) (summed). `other tenants' cores`: CPU used by "
        "every process on the machine (`/proc/stat`) minus the generating processes, per second of the run -- "
        "other work on this shared 2-core machine. `RSS growth`: peak RSS minus the RSS of the process just "
        "before generating (CA keys loaded, store open)."
    )
    for r in results:
        one = [g.seconds for g in r.runs if g.procs == 1]
        two = [g.seconds for g in r.runs if g.procs == 2]
        chk = r.check
        notes.append(
            f"- {r.n:,}: every full CRL parsed back: {chk.crls} CRLs, {chk.entries:,} entries (the store's count "
            f"of revoked, unexpired certificates), signatures valid, partition IDP and reason codes present; "
            + (f"**{len(chk.bad)} problems**: {chk.bad[0]}" if chk.bad else "no problem found")
            + f". Largest partition {max(chk.sizes):,} bytes ({max(chk.sizes) / SIZE_LIMIT:.0%} of 1 MiB)."
        )
        if r.n >= 1_000_000 and one:
            m1 = statistics.median(one)
            text = f"- 1M target (<= {TARGET_SECONDS:.0f} s): one process {m1:.1f} s " + (
                "**met**" if m1 <= TARGET_SECONDS else "missed"
            )
            if two:
                m2 = statistics.median(two)
                text += f"; two processes {m2:.1f} s " + ("**met**" if m2 <= TARGET_SECONDS else "missed")
                text += f" ({m1 / m2:.2f}x faster on 2 cores)"
            notes.append(text + ".")
        med_size = max(chk.sizes)
        heads.append(
            Headline(
                what=f"CRLs for {r.n:,} revoked certificates, {PARTITIONS} partitions, 1 process"
                + (" / 2 processes" if two else ""),
                paper="-",
                target=f"<= {TARGET_SECONDS:.0f} s, <= 1 MiB each" if r.n >= 1_000_000 else "<= 1 MiB each",
                measured=f"{statistics.median(one):.1f} s"
                + (f" / {statistics.median(two):.1f} s" if two else "")
                + f", largest {med_size / 1024:.0f} KiB",
                verdict=(
                    (
                        "**met**"
                        if min(statistics.median(one), statistics.median(two) if two else 1e9) <= TARGET_SECONDS
                        else "missed"
                    )
                    if r.n >= 1_000_000
                    else ("**met**" if med_size <= SIZE_LIMIT else "missed")
                ),
            )
        )
    extra: list[str] = []
    last = results[-1]
    if last.delta is not None:
        d = last.delta
        extra += [
            "",
            f"### Delta CRL after {DELTA_REVOCATIONS} fresh revocations ({last.n:,} base)",
            "",
            md_table(
                ["step", "p50 ms", "max ms", "entries", "DER bytes", "check"],
                [
                    [
                        f"`Va.revoke` x {len(d.revoke_times)} (store, audit, delta CRL regenerated)",
                        f"{percentile(d.revoke_times, 50) * 1000:.1f}",
                        f"{max(d.revoke_times) * 1000:.1f}",
                        "-",
                        "-",
                        "-",
                    ],
                    [
                        f"one more delta CRL of partition {DELTA_PARTITION} (`generate_crl(..., delta=True)`)",
                        f"{d.delta_seconds * 1000:.1f}",
                        "-",
                        d.delta_entries,
                        f"{d.delta_bytes:,}",
                        ("ok: " if d.ok else "**FAILED**: ") + d.note + f", base CRL number {d.base_number}",
                    ],
                ],
            ),
        ]
    if last.served is not None:
        sv = last.served
        extra += [
            "",
            f"### Served over NATS ({last.n:,})",
            "",
            f"A km worker process on the same deployment (real nats-server), `KmClient.crl` as `cm`: "
            f"{len(sv.times)} partitions of {min(sv.sizes):,}-{max(sv.sizes):,} bytes, "
            f"p50 {percentile(sv.times, 50) * 1000:.1f} ms, max {max(sv.times) * 1000:.1f} ms each; "
            + ("byte-identical to the stored CRLs." if sv.same else "**differ from the stored CRLs**."),
        ]
    if last.profile is not None:
        pr = last.profile
        extra += [
            "",
            f"### Where one partition's time goes ({last.n:,}, cProfile, one partition of {pr['size']:,} bytes)",
            "",
            f"{pr['seconds'] * 1000:.0f} ms under cProfile (it slows Python code, not Rust; read shares). Cumulative "
            "time of each function; indented rows are part of the row above.",
            "",
            md_table(
                ["function", "ms", "share of generate_crl"],
                [[what, f"{sec * 1000:.0f}", f"{share:.0%}"] for what, sec, share in pr["profile"]],
            ),
        ]
    section = "\n".join(
        [
            "## CRL generation (km VA), 64 partitions",
            "",
            f"Target: 1M revoked certificates in <= {TARGET_SECONDS:.0f} s across the {PARTITIONS} partitions of "
            "one issuing CA, each partition <= 1 MiB, memory bounded. Synthetic revoked certificates (20-octet "
            "serials, every entry with a reason code) inserted with `Store.add_certificates`; SQLite store of a "
            'fresh deployment (P-256 CA); `Va.generate_crl("operational", p)` for p = 0..63, each process '
            "with its own Store and Va. Times are wall seconds for all 64 partitions.",
            "",
            gen_table,
            "",
            "Memory (tracemalloc: Python allocations only; RSS above includes cryptography's Rust side):",
            "",
            mem_table,
            "",
            "Raw baseline: cryptography alone builds, signs and encodes a CRL with the median partition's number "
            "of entries (`RevokedCertificateBuilder` per entry, the list given to "
            "`CertificateRevocationListBuilder(revoked_certificates=...)` once, as `pki/crl.py` does):",
            "",
            raw_table,
            "",
            sign_table,
            "",
            "Population (not part of the figure; the file is cached for reruns):",
            "",
            pop_table,
            "",
            *notes,
            *extra,
            "",
            f"_Whole run: {took:.0f} s._",
        ]
    )
    return section, heads


async def run(args: argparse.Namespace) -> tuple[str, list[Headline]]:
    t0 = time.perf_counter()
    args.repeats = args.repeats or (1 if args.quick else 3)
    sizes = args.sizes or ([20_000] if args.quick else [100_000, 1_000_000])
    if args.quick:
        args.traced_partitions = min(args.traced_partitions, 4)
    log(f"crl: baseline (load {loadavg()})")
    sign = Summary.of([raw_sign_rate(0.15 if args.quick else 0.5) for _ in range(1 if args.quick else 3)])
    results = []
    for i, n in enumerate(sizes):
        results.append(await run_size(n, args, last=i == len(sizes) - 1))
    sign_end = Summary.of([raw_sign_rate(0.15 if args.quick else 0.5) for _ in range(1 if args.quick else 3)])
    return render(results, args, (sign, sign_end), time.perf_counter() - t0)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    section, heads = asyncio.run(run(args))
    emit(section, args, heads)


if __name__ == "__main__":
    main()
