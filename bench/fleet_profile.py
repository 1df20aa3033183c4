"""Where a fleet's transfer pass spends its time, and the raw TLS yardstick (bench/transfer_network.py).

- :func:`spy_start` / :func:`spy_stop`: py-spy records this process and its children (the device
  worker processes) for the devices' pass only -- every thread, so km's handlers (threads) and the
  devices' checks in ``asyncio.to_thread`` count too (cProfile sees one thread).
- :func:`breakdown`: the samples sorted into what the paper's reader asks about (TLS handshakes,
  key generation, message checks, issuance, store, ...), in ms of CPU per device, servers' process
  and device workers apart.
- :func:`raw_tls_handshake_ms`: one mutual-TLS handshake (P-256, client certificate, TLS 1.3), both
  ends in memory BIOs in one thread: the library's cost without sockets or an event loop.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

#: py-spy samples per second
RATE = 100

#: (what, substrings of a stack) in order: the first rule a stack matches takes its sample
DEVICE_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("TLS handshakes", ("do_handshake",)),
    ("TLS contexts (client certificate, key, anchors)", ("_client_context", "create_default_context")),
    ("new key pair (FR3)", ("generate_key (iotdlm/pki/keys.py", "generate_pending_key")),
    ("CSR", ("make_csr",)),
    ("transfer message check (parse, x5chain, COSE verify, claims)", ("receive (iotdlm/transfer/device.py",)),
    ("attestation evidence (sign)", ("make_evidence",)),
    ("EST proof and response checks", ("est_proof.py", "_certs_only", "_enroll (iotdlm/device/est_client.py")),
    ("device flash (files, PEM) and transfer state", ("iotdlm/device/simulated.py", "iotdlm/files.py",
                                                       "_apply (iotdlm/transfer/agent.py", "_save (iotdlm/transfer",
                                                       "state (iotdlm/transfer/agent.py", "_state (iotdlm/device")),
    ("HTTP client, TLS records, asyncio", ("aiohttp", "asyncio", "ssl.py")),
]  # fmt: skip
SERVER_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("TLS handshakes (cm)", ("do_handshake",)),
    ("CA2 issuance (build + sign)", ("iotdlm/pki/ca.py", "iotdlm/km/ca/")),
    ("store (SQLite)", ("iotdlm/store/",)),
    ("signed envelopes cm <-> km (sign, verify)", ("iotdlm/wire/envelope.py", "iotdlm/wire/reply")),
    ("km: checks, RA, attestation", ("iotdlm/km/", "iotdlm/transfer/attestation.py", "iotdlm/pki/")),
    ("NATS (client side)", ("iotdlm/bus/", "nats/")),
    ("cm handlers", ("iotdlm/cm/",)),
    ("HTTP server, TLS records, asyncio", ("aiohttp", "asyncio", "ssl.py")),
]


def spy_start(out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy on this process and its children (None when py-spy is not installed)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).is_file():
        return None
    cmd = [exe, "record", "--pid", str(os.getpid()), "--subprocesses", "--threads", "-r", str(RATE), "-f", "raw",
           "-o", str(out), "--nonblocking"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the pass starts
    return proc


def spy_stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)


def breakdown(raw: Path, n: int, seconds: float) -> str:
    """A Markdown table: CPU ms per device by what it was spent on, servers and devices apart."""
    main = str(os.getpid())
    got: dict[str, Counter[str]] = {"servers": Counter(), "devices": Counter()}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        procs = [f for f in stack.split(";") if f.startswith("process ")]
        pid = procs[-1].split(":", 1)[0].split()[1] if procs else main
        side = "servers" if pid == main else "devices"
        rules = SERVER_RULES if side == "servers" else DEVICE_RULES
        if side == "devices" and "worker_main" not in stack and "_bootstrap (threading.py" not in stack:
            what = "worker start-up (spawn, imports)"
        else:
            what = next((name for name, keys in rules if any(k in stack for k in keys)), "other Python")
        got[side][what] += int(count)
    rows = []
    for side, counter in got.items():
        total = sum(counter.values())
        for what, samples in counter.most_common():
            share = samples / max(total, 1) * 100
            rows.append(f"| {side} | {what} | {samples / RATE / n * 1000:.2f} | {share:.0f} % |")
        rows.append(f"| **{side}** | **all** | **{total / RATE / n * 1000:.2f}** | |")
    head = "| process | spent on | thread-busy ms per device | share |\n|---|---|---|---|"
    note = (
        f"\n\npy-spy, {RATE} samples/s of every thread not idle in the event loop during the devices' pass "
        f"({seconds:.1f} s); a sample is filed under the first rule its stack matches (bench/fleet_profile.py). "
        "Thread-busy time is not CPU time: it also counts a thread waiting in SQLite (the commit's disk sync) "
        "or for the GIL, and threads overlap; the CPU seconds are in the line above."
    )
    return head + "\n" + "\n".join(rows) + note


def _pair(path: Path, name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[str, str]:
    c, k = path / f"{name}.pem", path / f"{name}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))  # fmt: skip
    return str(c), str(k)


def _issue(name: str, key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey,
           ca_name: x509.Name | None, *, san: bool = False) -> x509.Certificate:  # fmt: skip
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    b = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name or subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca_name is None, path_length=None), critical=True)
    )  # fmt: skip
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def raw_tls_handshake_ms(iterations: int = 200) -> float:
    """Median ms of one mutual-TLS handshake (P-256 certificates, both ends, in memory)."""
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    ca = _issue("bench CA", keys[0], keys[0], None)
    server = _issue("localhost", keys[1], keys[0], ca.subject, san=True)
    client = _issue("device", keys[2], keys[0], ca.subject)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM).decode()
    with tempfile.TemporaryDirectory() as d:
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(*_pair(Path(d), "server", keys[1], server))
        sctx.verify_mode = ssl.CERT_REQUIRED
        sctx.load_verify_locations(cadata=ca_pem)
        cctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem)
        cctx.load_cert_chain(*_pair(Path(d), "client", keys[2], client))
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        _handshake(cctx, sctx)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def _handshake(cctx: ssl.SSLContext, sctx: ssl.SSLContext) -> None:
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = cctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    s = sctx.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(20):
        for i, (end, out, peer_in) in enumerate(((c, c_out, s_in), (s, s_out, c_in))):
            if not done[i]:
                try:
                    end.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            if out.pending:
                peer_in.write(out.read())
        if all(done) and not c_out.pending and not s_out.pending:
            return
    raise RuntimeError("the in-memory TLS handshake did not finish")


__all__ = ["breakdown", "raw_tls_handshake_ms", "spy_start", "spy_stop"]
