"""Where a km worker spends its time under load: py-spy on real km worker processes.

Starts a deployment like the other benchmarks, runs every km worker under ``py-spy record`` (raw
collapsed stacks, all threads), drives batch issuance from pm connections for a fixed time, stops
the workers and sums the samples into categories (store transactions, SQLite write-lock waits,
certificate signing, CSR/CRMF parsing, JWS, NATS/asyncio...).

- without ``--idle``: only samples where a thread was running (about: CPU time);
- with ``--idle``: every thread at every sample (wall time), so lock waits and sleeps show up.

py-spy is not a dependency of iotdlm: install it anywhere (``pip install --target /tmp/pyspy
py-spy``) and pass ``--py-spy /tmp/pyspy/bin/py-spy``, or have it on PATH. py-spy must start the
worker itself (attaching to a running process needs ptrace rights a sandbox may not give).

Without py-spy, ``--inproc`` profiles the km core (``Km.issue_batch``, real SQLite store, no bus)
in this process with cProfile; ``--cpu`` times single ``Km.issue`` requests the same way without a
profiler (CPU per certificate beside the raw build+sign of the same run).

Run: ``.venv/bin/python bench/profile_km.py [--workers 2] [--batch 100] [--duration 10] [--idle]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import os
import pstats
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from common import (
    BenchDeployment,
    bench_deployment,
    csr_der,
    device_keys,
    emit,
    find_pyspy,
    log,
    md_table,
    parse_args,
    raw_cert_builder,
    raw_cert_rate,
)
from iotdlm.client.km import KmClient
from iotdlm.wire import km as msg

#: (category, substrings of a frame "function (file:line)"), first match wins, deepest meaning first
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("startup: imports", ("_find_and_load (",)),
    ("SQLite write lock: BEGIN IMMEDIATE (waits for the other writer)", ("_on_begin (",)),
    ("store.get_device: one read transaction per item", ("get_device (",)),
    ("store.upsert_device: one write transaction per item", ("upsert_device (",)),
    ("store.add_certificates: one write transaction per request", ("add_certificates (",)),
    ("store.consume_nonce: one write transaction per request", ("consume_nonce (",)),
    ("CA: build + sign the certificate (cryptography)", ("issue (iotdlm/pki/ca.py", "ca.py:")),
    ("CSR: parse + verify signature", ("parse_csr (",)),
    ("CRMF: parse (pyasn1)", ("parse (iotdlm/pki/crmf/parsing.py", "pki/crmf/")),
    ("request: JWS verify + signer check", ("authenticate (", "peek_signer (")),
    ("record: DER, SHA-256 fingerprint, subject string", ("_record (",)),
    ("reply: msgspec encode", ("encode (iotdlm/wire/km.py", "wire/km.py:")),
    ("km core: other", ("km/core.py:", "km/signers.py:", "km/ra.py:")),
    ("NATS client + asyncio (event loop thread)", ()),
]

WAITS = ("executor thread idle (waiting for work)", "event loop idle (select)")


def categorize(frames: list[str]) -> str:
    if any("_worker (" in f and "thread.py" in f for f in frames) and not any("_WorkItem.run (" in f for f in frames):
        return WAITS[0]
    for name, keys in CATEGORIES[:-1]:
        if any(k in f for f in frames for k in keys):
            return name
    if any("select (" in f for f in frames[-2:]):
        return WAITS[1]
    return CATEGORIES[-1][0]


def read_raw(path: Path) -> list[tuple[list[str], int]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        out.append((frames, int(count)))
    return out


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


async def _load(bd: BenchDeployment, batch: int, connections: int, loops: int, seconds: float) -> int:
    keys = device_keys(64)
    pool = [csr_der(keys[i % 64], f"dev-{i:07d}") for i in range(20000)]
    pos = 0
    done = 0
    clients = [await bd.pm_client() for _ in range(connections)]

    async def loop(client: KmClient) -> None:
        nonlocal pos, done
        while time.perf_counter() < deadline:
            items = []
            for _ in range(batch):
                i = pos % len(pool)
                pos += 1
                items.append(msg.IssueItem(device_id=f"dev-{i:07d}", profile="factory", csr=pool[i]))
            if batch == 1:
                (it,) = items
                await client.issue(it.device_id, it.profile, csr=it.csr)
                done += 1
            else:
                res = await client.issue_batch(items)
                done += sum(1 for r in res if r.certificate is not None)

    deadline = time.perf_counter() + seconds
    await asyncio.gather(*(loop(c) for c in clients for _ in range(loops)))
    return done


async def run_pyspy(args: argparse.Namespace) -> str:
    out_dir = Path(tempfile.mkdtemp(prefix="iotdlm-pyspy-"))
    rows: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    async with bench_deployment(workers=0) as bd:
        wrappers = []
        for i in range(args.workers):
            raw = out_dir / f"km-{i}.txt"
            cmd = [args.py_spy, "record", "-f", "raw", "-o", str(raw), "-r", str(args.rate), "--threads"]
            if args.idle:
                cmd.append("--idle")
            wrappers.append((raw, [*cmd, "--"]))
        for _raw, wrapper in wrappers:
            await bd.set_workers(len(bd.workers) + 1, wrapper=wrapper)
        log(f"profile: {args.workers} worker(s) under py-spy; load: batch {args.batch} for {args.duration} s")
        t0 = time.perf_counter()
        certs = await _load(bd, args.batch, args.connections, args.loops, args.duration)
        elapsed = time.perf_counter() - t0
        log(f"profile: {certs} certificates in {elapsed:.1f} s = {certs / elapsed:,.0f}/s under the profiler")
        # stop each km (py-spy's child) with SIGTERM; py-spy then writes its file and exits
        for w in bd.workers:
            for child in _children(w.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGTERM)
        for w in bd.workers:
            w.proc.wait(timeout=60)
    for raw, _ in wrappers:
        for frames, count in read_raw(raw):
            rows[categorize(frames)] += count
            if frames and categorize(frames) not in WAITS and not categorize(frames).startswith("startup"):
                leaves[frames[-1]] += count
    if args.keep_raw:
        log(f"profile: raw py-spy stacks kept in {out_dir}")
    else:
        shutil.rmtree(out_dir, ignore_errors=True)
    busy = sum(v for k, v in rows.items() if k not in WAITS and not k.startswith("startup"))
    table = [
        [name, rows[name], f"{rows[name] / busy:.0%}" if name not in WAITS and not name.startswith("startup") else "-"]
        for name, _ in CATEGORIES
        if rows[name]
    ] + [[w, rows[w], "-"] for w in WAITS if rows[w]]
    top = [[f"`{f}`", n, f"{n / busy:.0%}"] for f, n in leaves.most_common(args.top)]
    mode = "wall time (--idle: every thread, running or waiting)" if args.idle else "on-CPU samples"
    return "\n".join(
        [
            f"## km worker profile: {args.workers} worker(s), batch {args.batch}, {mode}",
            "",
            f"py-spy sampled every thread of {args.workers} km worker process(es) ({args.rate} samples/s per "
            f"thread) while {args.connections} pm connections sent "
            + ("single `issue` requests" if args.batch == 1 else f"`issue_batch` requests of {args.batch}")
            + f": {certs:,} certificates in {elapsed:.1f} s ({certs / elapsed:,.0f}/s while profiled; "
            "sampling slows the workers down, so read shares, not rates). "
            + (
                "Wall time: a thread waiting (for a lock, for the GIL, in a sleep) is counted where it waits. "
                if args.idle
                else "On-CPU samples only. "
            )
            + "`share` is of the samples that were neither startup nor an idle thread. Rows are exclusive, "
            "first match from the top: e.g. time in `BEGIN IMMEDIATE` (taking SQLite's write lock, and "
            "waiting for it while another thread or worker holds it) is not counted again under the store "
            "method that began the transaction.",
            "",
            md_table(["where", "samples", "share"], table),
            "",
            f"Top {args.top} innermost Python frames (self time):",
            "",
            md_table(["frame", "samples", "share"], top),
        ]
    )


@contextlib.contextmanager
def _inproc_km() -> Iterator[tuple[Any, Any, Any]]:
    """(km, pm's sealer, clock): km's core on a real SQLite store in a temporary deployment, no bus."""
    from iotdlm.clock import SystemClock
    from iotdlm.deployment import init_deployment
    from iotdlm.pki.keys import Algorithm
    from iotdlm.runtime import build_km, open_store, record_identities, sealer_for

    clock = SystemClock()
    with tempfile.TemporaryDirectory(prefix="iotdlm-prof-") as tmp:
        dep, _ = init_deployment(
            Path(tmp) / "data",
            organization="Bench",
            algorithm=Algorithm.P256,
            dtypes=["polarfire-soc"],
            passphrase=b"bench",
            nats_port=14222,
            now=clock.now(),
        )
        store = open_store(dep)
        record_identities(dep, store, clock.now())
        try:
            km = build_km(dep, store, clock, passphrase=b"bench")
            km.bench_dep = dep  # for sealers of other modules (run_breakdown)
            yield km, sealer_for(dep.identity("pm-polarfire-soc")), clock
        finally:
            store.close()


def run_inproc(args: argparse.Namespace) -> str:
    from iotdlm.wire.km import AUDIENCE, OP_ISSUE_BATCH

    with _inproc_km() as (km, sealer, clock):
        keys = device_keys(64)
        n = max(1, int(args.duration * 800 / args.batch))

        def token(off: int) -> bytes:
            items = [
                msg.IssueItem(
                    device_id=f"dev-{off + j:07d}", profile="factory", csr=csr_der(keys[j % 64], f"dev-{off + j:07d}")
                )
                for j in range(args.batch)
            ]
            return sealer.seal(OP_ISSUE_BATCH, msg.BatchIssueRequest(items=items), aud=AUDIENCE, now=clock.now())

        km.issue_batch(token(10_000_000))
        tokens = [token(i * args.batch) for i in range(n)]
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for t in tokens:
            km.issue_batch(t)
        prof.disable()
        elapsed = time.perf_counter() - t0
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(args.top)
    return "\n".join(
        [
            f"## km core in-process (cProfile, no bus), batch {args.batch}",
            "",
            f"{n * args.batch:,} certificates in {elapsed:.2f} s under cProfile "
            f"({n * args.batch / elapsed:,.0f}/s; cProfile slows Python code down).",
            "",
            "```",
            buf.getvalue().strip(),
            "```",
        ]
    )


def _cpu_per_call(fn: Callable[[Any], object], items: Sequence[Any], pause: float) -> float:
    """CPU seconds per ``fn(item)`` of this process, counting the calls only, ``pause`` seconds asleep
    between them."""
    spent = 0.0
    for item in items:
        c = time.process_time()
        fn(item)
        spent += time.process_time() - c
        if pause:
            time.sleep(pause)
    return spent / len(items)


def run_cpu(args: argparse.Namespace) -> str:
    """CPU per certificate of single ``Km.issue`` requests in this process (no profiler, no bus),
    beside the raw build+sign rate measured just before and after; with ``--pauses``, also with the
    process asleep that long between requests (a request that comes alone finds the caches cold)."""
    from iotdlm.wire.km import AUDIENCE, OP_ISSUE

    n = max(50, int(args.duration * 400))
    paused = [p for p in args.pauses if p > 0]
    n_paused = min(n, 300)
    raw_before = raw_cert_rate()
    with _inproc_km() as (km, sealer, clock):
        keys = device_keys(64)
        tokens = [
            sealer.seal(
                OP_ISSUE,
                msg.IssueItem(device_id=f"dev-{i:07d}", profile="factory", csr=csr_der(keys[i % 64], f"dev-{i:07d}")),
                aud=AUDIENCE,
                now=clock.now(),
            )
            for i in range(n + 1 + n_paused * len(paused))
        ]
        km.issue(tokens[0])
        wall, cpu = time.perf_counter(), time.process_time()
        for t in tokens[1 : n + 1]:
            km.issue(t)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rest = iter(tokens[n + 1 :])
        build = raw_cert_builder()
        cold = [
            (
                p,
                _cpu_per_call(km.issue, [next(rest) for _ in range(n_paused)], p / 1000),
                _cpu_per_call(lambda _i: build(), range(n_paused), p / 1000),
            )
            for p in paused
        ]
    raw_after = raw_cert_rate()
    raw_ms = 1000 / max(raw_before, raw_after)
    km_ms = cpu * 1000 / n
    lines = [
        "## km core in-process: CPU per single `issue` request (no bus, no profiler)",
        "",
        md_table(
            ["requests", "km CPU ms/cert", "wall ms/cert", "raw build+sign ms (best of before/after)", "raw / km"],
            [[n, f"{km_ms:.3f}", f"{wall * 1000 / n:.3f}", f"{raw_ms:.3f}", f"{raw_ms / km_ms:.2f}x"]],
        ),
        "",
    ]
    if cold:
        lines += [
            f"With the process asleep between requests ({n_paused} requests per pause; only the calls are "
            "counted, the same for a raw build + sign with the same pauses):",
            "",
            md_table(
                ["pause ms", "km CPU ms/issue", "vs back to back", "raw build+sign CPU ms", "vs back to back"],
                [["0", f"{km_ms:.3f}", "1.00x", f"{raw_ms:.3f}", "1.00x"]]
                + [
                    [
                        f"{p:g}",
                        f"{k * 1e3:.3f}",
                        f"{k * 1e3 / km_ms:.2f}x",
                        f"{r * 1e3:.3f}",
                        f"{r * 1e3 / raw_ms:.2f}x",
                    ]
                    for p, k, r in cold
                ],
            ),
            "",
        ]
    lines.append(f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}.")
    return "\n".join(lines)


#: (label, dotted owner, attribute): the leaf steps of one request, timed exclusively (none calls another)
ISSUE_STEPS = [
    ("JWS envelope: verify (joserfc, ECDSA)", "iotdlm.wire.envelope", "verify"),
    ("request signer: chain check or cache hit", "iotdlm.km.signers.SignerCache", "trust"),
    ("CSR: parse + verify (cryptography)", "iotdlm.km.core", "parse_csr"),
    ("store: device read (own transaction)", "store", "get_device"),
    ("CA: build + sign the certificate (incl. SAN)", "iotdlm.pki.ca.IssuingCA", "issue"),
    ("record: DER, SHA-256, subject string", "iotdlm.km.core", "record_for"),
    ("store: write certificate + audit + device + nonce (one transaction)", "store", "add_certificate_writes"),
]
EST_STEPS = [
    ("JWS envelopes (2 requests): verify", "iotdlm.wire.envelope", "verify"),
    ("request signer (cm): cache hit", "iotdlm.km.signers.SignerCache", "trust"),
    ("presented certificate: chain check (ECDSA) or cache hit", "CHAIN", "verify_issued_by"),
    (
        "store: reads (presented certificate, registration, device)",
        "store",
        "get_factory|get_by_fingerprint|get_device|presented_rows",
    ),
    ("store: writes (nonce spends, proof nonce, issuance)", "store", "consume_nonce|add_certificate_writes"),
    ("EST proof: nonce MAC + ECDSA verify", "iotdlm.pki.est_proof", "verify|nonce_expiry|issue_nonce"),
    ("CSR: parse + verify (cryptography)", "iotdlm.km.core", "parse_csr"),
    ("CA: build + sign the certificate", "iotdlm.pki.ca.IssuingCA", "issue"),
    ("record: DER, SHA-256, subject string", "iotdlm.km.core", "record_for"),
]


def _timed(steps: list[tuple[str, str, str]], km: Any, spent: Counter[str]) -> contextlib.ExitStack:
    """Wrap each step's functions to add their CPU time to ``spent`` (this thread's CPU: time spent
    waiting for the machine's other tenants is not counted)."""
    import importlib
    import importlib.util
    from unittest import mock

    stack = contextlib.ExitStack()

    def wrap(label: str, fn: Any) -> Any:
        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                spent[label] += time.thread_time() - t0

        return timed

    for label, owner, names in steps:
        for name in names.split("|"):
            if owner == "store":
                targets = [km.store]
            elif owner == "CHAIN":  # wherever km's EST path checks a presented certificate's chain
                targets = [
                    importlib.import_module(m)
                    for m in ("iotdlm.km.core", "iotdlm.km.presented")
                    if importlib.util.find_spec(m) is not None
                ]
            else:
                try:
                    targets = [importlib.import_module(owner)]
                except ModuleNotFoundError:
                    mod, _, cls = owner.rpartition(".")
                    targets = [getattr(importlib.import_module(mod), cls)]
            for target in targets:
                if hasattr(target, name):
                    stack.enter_context(mock.patch.object(target, name, wrap(label, getattr(target, name))))
            if name == "add_certificate_writes":  # the group commit holds the store's method
                stack.enter_context(mock.patch.object(km._group, "_write", wrap(label, km._group._write)))
    return stack


def _breakdown_rows(steps: list[tuple[str, str, str]], spent: Counter[str], total: float, n: int) -> list[list[Any]]:
    rows = [[label, f"{spent[label] * 1000 / n:.3f}", f"{spent[label] / total:.0%}"] for label, _o, _n in steps]
    rest = total - sum(spent.values())
    rows.append(
        [
            "km's own Python (authorize, audit entries, group commit, reply)",
            f"{rest * 1000 / n:.3f}",
            f"{rest / total:.0%}",
        ]
    )
    rows.append(["**total**", f"**{total * 1000 / n:.3f}**", "100%"])
    return rows


def run_breakdown(args: argparse.Namespace) -> str:
    """Where the CPU of one single ``issue`` request and of one EST enrollment (nonce + simpleenroll)
    goes, in this process (no bus), each step timed around its call."""
    from iotdlm.pki import est_proof
    from iotdlm.runtime import sealer_for
    from iotdlm.wire.km import AUDIENCE, OP_EST, OP_EST_NONCE, OP_ISSUE, OP_ISSUE_BATCH

    n = max(100, int(args.duration * 150))
    with _inproc_km() as (km, pm, clock):
        cm = sealer_for(km.bench_dep.identity("cm"))
        keys, new_keys = device_keys(n + 1), device_keys(n + 1)
        issue_tokens = [
            pm.seal(
                OP_ISSUE,
                msg.IssueItem(device_id=f"iss-{i:07d}", profile="factory", csr=csr_der(keys[i], f"iss-{i:07d}")),
                aud=AUDIENCE,
                now=clock.now(),
            )
            for i in range(n + 1)
        ]
        km.issue(issue_tokens[0])
        spent: Counter[str] = Counter()
        with _timed(ISSUE_STEPS, km, spent):
            t0 = time.thread_time()
            for t in issue_tokens[1:]:
                km.issue(t)
            issue_total = time.thread_time() - t0
        factory: list[bytes] = []
        for off in range(0, n + 1, 100):
            items = [
                msg.IssueItem(device_id=f"est-{i:07d}", profile="factory", csr=csr_der(keys[i], f"est-{i:07d}"))
                for i in range(off, min(n + 1, off + 100))
            ]
            res = km.issue_batch(
                pm.seal(OP_ISSUE_BATCH, msg.BatchIssueRequest(items=items), aud=AUDIENCE, now=clock.now())
            )
            factory += [r.certificate.certificate for r in res.results]

        def enroll(i: int) -> float:
            asked = cm.seal(
                OP_EST_NONCE, msg.EstNonceRequest(client_certificate=factory[i]), aud=AUDIENCE, now=clock.now()
            )
            t0 = time.thread_time()
            nonce = km.est_nonce(asked).nonce
            took = time.thread_time() - t0
            proof = est_proof.make(keys[i], "simpleenroll", nonce, new_keys[i].public_key())
            body = msg.EstRequest(
                operation="simpleenroll",
                client_certificate=factory[i],
                csr=csr_der(new_keys[i], f"est-{i:07d}"),
                proof=proof,
            )
            token = cm.seal(OP_EST, body, aud=AUDIENCE, now=clock.now())
            t0 = time.thread_time()
            km.est(token)
            return took + time.thread_time() - t0

        enroll(0)
        est_spent: Counter[str] = Counter()
        # the steps' own time only: the device's proof and cm's sealing happen outside km's calls
        with _timed(EST_STEPS, km, est_spent):
            est_total = sum(enroll(i) for i in range(1, n + 1))
    return "\n".join(
        [
            "## km core in-process: where one single request's CPU goes (no bus)",
            "",
            f"{n} single `issue` requests (pm, CSR, profile factory) and {n} EST enrollments (cm relays `est_nonce`, "
            "then `simpleenroll` with the device's proof) on a real SQLite store, one thread; each step timed around "
            "its call (ms per request, then its share).",
            "",
            md_table(["single `issue`: step", "ms", "share"], _breakdown_rows(ISSUE_STEPS, spent, issue_total, n)),
            "",
            md_table(
                ["EST enrollment (nonce + simpleenroll): step", "ms", "share"],
                _breakdown_rows(EST_STEPS, est_spent, est_total, n),
            ),
            "",
            f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}.",
        ]
    )


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--loops", type=int, help="request loops per connection (default: 8 for batch 1, else 1)")
    p.add_argument("--duration", type=float, default=None, help="seconds of load (default 10; 2 with --quick)")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--idle", action="store_true", help="wall time: include waiting threads")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--py-spy", default=find_pyspy(), help="py-spy binary (default: on PATH, else the venv's)")
    p.add_argument("--keep-raw", action="store_true", help="keep py-spy's raw stack files (path is logged)")
    p.add_argument("--inproc", action="store_true", help="cProfile the km core in this process instead")
    p.add_argument(
        "--cpu", action="store_true", help="CPU per single request of the km core in this process, no profiler"
    )
    p.add_argument(
        "--pauses",
        type=float,
        nargs="+",
        default=[0.0],
        metavar="MS",
        help="with --cpu: also measure with the process asleep this many ms between requests (e.g. 2 10)",
    )
    p.add_argument(
        "--breakdown", action="store_true", help="where one single issue and one EST enrollment spend km's CPU"
    )


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    if args.duration is None:
        args.duration = 2.0 if args.quick else 10.0
    if args.loops is None:
        args.loops = 8 if args.batch == 1 else 1
    if args.breakdown:
        section = run_breakdown(args)
    elif args.cpu:
        section = run_cpu(args)
    elif args.inproc:
        section = run_inproc(args)
    elif not args.py_spy:
        raise SystemExit("py-spy not found: pass --py-spy PATH, or use --inproc for cProfile of the km core")
    else:
        section = asyncio.run(run_pyspy(args))
    emit(section, args)


if __name__ == "__main__":
    main()
