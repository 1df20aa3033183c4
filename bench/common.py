"""Shared setup for the km benchmarks: a real deployment, a real nats-server, km as OS processes.

Everything here is what ``iotdlm demo`` does (see ``iotdlm.cli.demo``), made reusable:

- :class:`BenchDeployment` -- a deployment in a temporary folder (P-256, SQLite store under the
  deployment, module identities recorded), the embedded nats-server on a free loopback port,
  N ``python -m iotdlm.cli.main km serve`` worker processes, and pm connections (``pm-<dtype>``);
- raw library baselines measured in the same run (ECDSA P-256 signatures/s, certificates/s built
  with cryptography's ``CertificateBuilder.sign``), so figures can be compared on a noisy machine;
- machine information, simple statistics, Markdown tables, per-process CPU accounting.

No benchmark asserts anything about time: they measure and print.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import multiprocessing.context
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cryptography
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from iotdlm.bus import Bus
from iotdlm.bus.server import EmbeddedNatsServer, find_nats_server, free_port
from iotdlm.client.km import KmClient
from iotdlm.clock import SystemClock
from iotdlm.deployment import PASSPHRASE_ENV, Deployment, init_deployment
from iotdlm.errors import UnavailableError
from iotdlm.pki.keys import Algorithm
from iotdlm.pki.names import DEFAULT_ENTERPRISE_NUMBER, device_uri
from iotdlm.pki.profiles import policy_oid
from iotdlm.runtime import connect_identity, km_trust, nats_server, open_store, record_identities, sealer_for

DTYPE = "polarfire-soc"
ORGANIZATION = "Bench Factory"
REPO = Path(__file__).resolve().parent.parent


def log(text: str) -> None:
    """Progress goes to stderr; stdout carries only the Markdown result."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def load_client_context() -> multiprocessing.context.BaseContext:
    """Where load-generator processes come from: a fork server that imported the benchmark script
    once (not ``fork``: this process runs threads and an event loop; not ``spawn``: each client would
    import the script and iotdlm again, a CPU-second apiece on this machine)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__"])
    return ctx


# ------------------------------------------------------------------------------------ arguments


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a fast smoke run (a few seconds), not for figures")
    p.add_argument("--md", type=Path, help="also write the Markdown section to this file")
    p.add_argument("--json", type=Path, help="also write the headline figures (for run_all.py) to this file")
    if extra is not None:
        extra(p)
    return p.parse_args()


@dataclass(frozen=True)
class Headline:
    """One line of the summary table in docs/benchmarks.md (``run_all.py`` collects them as JSON).

    ``yardstick`` names what the figure is divided by (measured in the same run) and ``ratio`` is the
    quotient, so the summary can compare runs on a machine whose speed varies; ``load`` is the load
    average when the figure was taken (``run_all.py`` fills it in when a script leaves it empty).
    """

    what: str
    paper: str
    target: str
    measured: str
    verdict: str
    yardstick: str = ""
    ratio: float | None = None
    load: str = ""


def emit(section: str, args: argparse.Namespace, headlines: Sequence[Headline] = ()) -> None:
    print(section)
    if args.md is not None:
        args.md.write_text(section + "\n", encoding="utf-8")
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(h) for h in headlines], indent=2), encoding="utf-8")


# ------------------------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sequence."""
    if not values:
        return float("nan")
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    n: int
    min: float
    p50: float
    p95: float
    max: float
    mean: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(
            n=len(values),
            min=min(values),
            p50=percentile(values, 50),
            p95=percentile(values, 95),
            max=max(values),
            mean=statistics.fmean(values),
        )


def ms(seconds: float) -> str:
    """Seconds as milliseconds with sensible precision."""
    v = seconds * 1000.0
    if v < 10:
        return f"{v:.2f}"
    if v < 100:
        return f"{v:.1f}"
    return f"{v:.0f}"


def rate(x: float) -> str:
    return f"{x:,.0f}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# ------------------------------------------------------------------------------------ machine


def machine_info() -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = os.cpu_count() or 0
    try:
        from cryptography.hazmat.backends.openssl.backend import backend

        openssl = backend.openssl_version_text()
    except Exception:  # pragma: no cover - informational only
        openssl = "?"
    try:
        nats_version = subprocess.run(
            [find_nats_server(), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except Exception:
        nats_version = "?"
    commit = _source_description()
    load1, load5, load15 = os.getloadavg()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "nproc": str(affinity),
        "python": platform.python_version(),
        "cryptography": f"{cryptography.__version__} ({openssl})",
        "nats-server": nats_version,
        "sqlite": sqlite3.sqlite_version,
        "iotdlm commit": commit,
        "load average at start": f"{load1:.2f} {load5:.2f} {load15:.2f}",
    }


def _source_description() -> str:
    """Which iotdlm code ran: the work tree's commit (and whether src/ was clean), or an exported tree.

    To benchmark a committed state while src/ is being edited, export it and put it first on the path:
    ``git archive HEAD src | tar -x -C /tmp/snap`` then ``PYTHONPATH=/tmp/snap/src`` (km workers inherit
    it); a file ``/tmp/snap/COMMIT`` holding the commit id is reported here.
    """
    import iotdlm

    src = Path(iotdlm.__file__).resolve().parent.parent
    marker = src.parent / "COMMIT"
    if src != REPO / "src":
        named = marker.read_text().strip() if marker.is_file() else "unknown commit"
        return f"{named} (exported tree at {src})"
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return "?"
    return commit + (" (src/ has uncommitted changes)" if dirty else "")


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------ CPU accounting

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu(pid: int) -> float:
    """user+system CPU seconds used so far by process ``pid`` (its threads included); 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # after the ")" : state(0) ppid(1) ... utime(11) stime(12)
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


# ------------------------------------------------------------------------------------ baselines

_BASE_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "baseline")])


@dataclass(frozen=True)
class Baseline:
    """Raw library rates measured in this run (each: min / median / max over repeats)."""

    sign_per_s: Summary
    cert_per_s: Summary
    keygen_per_s: Summary

    def rows(self, label: str) -> list[list[str]]:
        return [
            [f"{label}: ECDSA P-256 `key.sign`", "signatures/s", *_spread(self.sign_per_s)],
            [f"{label}: `CertificateBuilder.sign` (km-like certificate)", "certificates/s", *_spread(self.cert_per_s)],
            [f"{label}: P-256 key generation", "keys/s", *_spread(self.keygen_per_s)],
        ]


def _spread(s: Summary) -> list[str]:
    return [rate(s.min), rate(s.p50), rate(s.max)]


def _timed_rate(fn: Callable[[], object], seconds: float) -> float:
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            fn()
        n += 50
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def raw_sign_rate(seconds: float = 0.5) -> float:
    """ECDSA P-256 signatures/s, single thread, over 300 bytes (about a certificate's TBS)."""
    key = ec.generate_private_key(ec.SECP256R1())
    data = os.urandom(300)
    algo = ec.ECDSA(hashes.SHA256())
    return _timed_rate(lambda: key.sign(data, algo), seconds)


def raw_keygen_rate(seconds: float = 0.5) -> float:
    curve = ec.SECP256R1()
    return _timed_rate(lambda: ec.generate_private_key(curve), seconds)


def find_pyspy() -> str | None:
    """The py-spy binary: on PATH, else beside this Python (the venv's, where `make venv` puts it)."""
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.is_file() else None


def raw_cert_rate(seconds: float = 0.5) -> float:
    """Certificates/s from cryptography's CertificateBuilder.sign, single thread, with the extensions
    km puts in a device certificate (so it is the ceiling of one km worker, not a toy certificate)."""
    return _timed_rate(raw_cert_builder(), seconds)


def raw_cert_builder() -> Callable[[], x509.Certificate]:
    """Builds and signs one km-like device certificate per call (:func:`raw_cert_rate`'s unit)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    now = dt.datetime.now(dt.UTC)
    policy = policy_oid(DEFAULT_ENTERPRISE_NUMBER, "factory")
    device_urn = device_uri("dev-000001", enterprise_number=DEFAULT_ENTERPRISE_NUMBER)

    def build() -> x509.Certificate:
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, DTYPE),
                x509.NameAttribute(NameOID.SERIAL_NUMBER, "dev-000001"),
                x509.NameAttribute(NameOID.COMMON_NAME, "dev-000001"),
            ]
        )
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(_BASE_NAME)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=90))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .add_extension(aki, critical=False)
            .add_extension(x509.CertificatePolicies([x509.PolicyInformation(policy, None)]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(device_urn)]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityInformationAccess(
                    [
                        x509.AccessDescription(
                            AuthorityInformationAccessOID.OCSP,
                            x509.UniformResourceIdentifier("http://127.0.0.1:8080/ocsp"),
                        ),
                        x509.AccessDescription(
                            AuthorityInformationAccessOID.CA_ISSUERS,
                            x509.UniformResourceIdentifier("http://127.0.0.1:8080/ca/factory.crt"),
                        ),
                    ]
                ),
                critical=False,
            )
            .add_extension(
                x509.CRLDistributionPoints(
                    [
                        x509.DistributionPoint(
                            full_name=[x509.UniformResourceIdentifier("http://127.0.0.1:8080/crl/factory.crl")],
                            relative_name=None,
                            reasons=None,
                            crl_issuer=None,
                        )
                    ]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )

    return build


def measure_baseline(quick: bool) -> Baseline:
    """Each raw rate measured over a few short repeats (0.5 s each; 0.05 s once with --quick, whose
    figures are a smoke run: the baselines' 0.45 CPU-seconds a call were ~10% of `make bench QUICK=1`)."""
    repeats, seconds = (1, 0.05) if quick else (3, 0.5)
    return Baseline(
        sign_per_s=Summary.of([raw_sign_rate(seconds) for _ in range(repeats)]),
        cert_per_s=Summary.of([raw_cert_rate(seconds) for _ in range(repeats)]),
        keygen_per_s=Summary.of([raw_keygen_rate(seconds) for _ in range(repeats)]),
    )


def baseline_table(before: Baseline, after: Baseline | None = None) -> str:
    rows = before.rows("start of run")
    if after is not None:
        rows += after.rows("end of run")
    return md_table(["raw library baseline (one thread, this run)", "unit", "min", "median", "max"], rows)


# ------------------------------------------------------------------------------------ device requests


def csr_der(key: ec.EllipticCurvePrivateKey, device_id: str) -> bytes:
    """A PKCS#10 request as a device makes it: its id as CN, signed with its own key."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


def device_keys(n: int) -> list[ec.EllipticCurvePrivateKey]:
    return [ec.generate_private_key(ec.SECP256R1()) for _ in range(n)]


# ------------------------------------------------------------------------------------ deployment


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class BenchDeployment:
    """A deployment in a temp folder with its NATS server and km worker processes.

    Use :func:`bench_deployment` (an async context manager) to get one; it tears everything down.
    """

    root: Path
    dep: Deployment
    passphrase: str
    server: EmbeddedNatsServer
    clock: SystemClock = field(default_factory=SystemClock)
    workers: list[Worker] = field(default_factory=list)
    buses: list[Bus] = field(default_factory=list)
    _spawned: int = 0

    # --- km workers --------------------------------------------------------------------------
    def _spawn(self, wrapper: Sequence[str] = ()) -> Worker:
        self._spawned += 1
        log_path = self.dep.root / "logs" / f"km-{self._spawned}.log"
        env = dict(os.environ, **{PASSPHRASE_ENV: self.passphrase})
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [*wrapper, sys.executable, "-m", "iotdlm.cli.main", "km", "serve", "--data", str(self.dep.root)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        return Worker(proc, log_path)

    async def set_workers(self, n: int, *, wrapper: Sequence[str] = (), wait: float = 60.0) -> None:
        """Start or stop km worker processes until exactly ``n`` run, and wait until each serves."""
        while len(self.workers) > n:
            _stop_worker(self.workers.pop())
        new = [self._spawn(wrapper) for _ in range(n - len(self.workers))]
        self.workers.extend(new)
        deadline = time.monotonic() + wait
        for w in new:
            while b"km serving on" not in w.log_path.read_bytes():
                if w.proc.poll() is not None:
                    raise UnavailableError(
                        f"km worker exited with code {w.proc.returncode}:\n{w.log_path.read_text(errors='replace')}"
                    )
                if time.monotonic() > deadline:
                    raise UnavailableError(f"km worker did not start within {wait} s; see {w.log_path}")
                await asyncio.sleep(0.05)
        # and km answers over NATS (KmClient.chain(), as the demo waits for it)
        client = await self.pm_client()
        while True:
            try:
                await client.chain()
                break
            except UnavailableError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        await self.close_bus(client.bus)

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    # --- pm ----------------------------------------------------------------------------------
    async def pm_client(self, *, request_timeout: float = 30.0) -> KmClient:
        """A new NATS connection as ``pm-<dtype>`` and a KmClient signing as that pm."""
        bus, ident = await connect_identity(self.dep, f"pm-{DTYPE}")
        self.buses.append(bus)
        return KmClient(bus, sealer_for(ident), self.clock, timeout=request_timeout, trust=km_trust(self.dep))

    async def close_bus(self, bus: Bus) -> None:
        with contextlib.suppress(ValueError):
            self.buses.remove(bus)
        with contextlib.suppress(Exception):
            await bus.close()

    # --- store -------------------------------------------------------------------------------
    def count_certificates(self, **filters: Any) -> int:
        """Certificates recorded in the deployment's store (opened afresh, as an auditor would)."""
        store = open_store(self.dep, migrate=False)
        try:
            return store.count_certificates(**filters)
        finally:
            store.close()

    def db_size(self) -> int:
        db = self.dep.root / "db"
        return sum(p.stat().st_size for p in db.iterdir() if p.is_file())


def _stop_worker(w: Worker) -> None:
    if w.proc.poll() is None:
        w.proc.terminate()
        try:
            w.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()


async def publish_mode(dep: Any, mode: str) -> None:
    """Publish the operation mode as the supervisor would (km checks it: pm gets device
    certificates only in provisioning-certificate). The benchmarks run km without a supervisor."""
    import datetime as _dt

    from iotdlm.bus import subjects
    from iotdlm.modes.signed import seal_record
    from iotdlm.runtime import connect_identity, sealer_for
    from iotdlm.wire.modes import ModeRecord

    bus, ident = await connect_identity(dep, "modes")
    try:
        kv = await bus.key_value(subjects.MODE_BUCKET, create=True)
        now = _dt.datetime.now(_dt.UTC)
        record = ModeRecord(mode=mode, since=now.isoformat(), by="bench")
        await kv.put(subjects.MODE_KEY, seal_record(sealer_for(ident), record, now=now))
    finally:
        await bus.close()


@contextlib.asynccontextmanager
async def bench_deployment(workers: int = 1, *, keep: Path | None = None) -> Any:
    """Create a deployment (P-256, SQLite under the deployment), start NATS and ``workers`` km processes."""
    tmp = tempfile.mkdtemp(prefix="iotdlm-bench-")
    root = Path(tmp) / "data"
    passphrase = os.urandom(16).hex()
    clock = SystemClock()
    dep, _cas = init_deployment(
        root,
        organization=ORGANIZATION,
        algorithm=Algorithm.P256,
        dtypes=[DTYPE],
        passphrase=passphrase.encode(),
        nats_port=free_port(),
        now=clock.now(),
    )
    store = open_store(dep)
    record_identities(dep, store, clock.now())
    store.close()
    server = nats_server(dep)
    server.start()
    await publish_mode(dep, "provisioning-certificate")
    bd = BenchDeployment(root=root, dep=dep, passphrase=passphrase, server=server, clock=clock)
    try:
        if workers:
            await bd.set_workers(workers)
        yield bd
    finally:
        for bus in list(bd.buses):
            await bd.close_bus(bus)
        for w in bd.workers:
            _stop_worker(w)
        bd.workers.clear()
        server.stop()
        if keep is not None:
            shutil.copytree(root, keep, dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def cpu_meter(pids: Sequence[int]) -> Iterator[dict[str, float]]:
    """CPU seconds used during the block by ``pids`` (summed) and by this process."""
    out: dict[str, float] = {}
    before = [proc_cpu(p) for p in pids]
    me = time.process_time()
    yield out
    out["pids"] = sum(proc_cpu(p) - b for p, b in zip(pids, before, strict=True))
    out["self"] = time.process_time() - me
