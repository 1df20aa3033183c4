"""Sustained certificate issuance by km over NATS, persisted, with concurrent pm connections.

Target: >= 2,500 certificates/s on a 2-core machine with 2 km workers (1 worker shown too).

Several pm connections (``pm-<dtype>``) each run a few request loops for a fixed duration; a loop
sends a request, waits for the answer, sends the next. Batch size 1 uses the single-request API
(``KmClient.issue``), larger sizes ``KmClient.issue_batch``. Device CSRs are generated BEFORE the
clock starts (a device makes its CSR, not pm, and generating them here would take CPU from km):
a pool of P-256 keys, one CSR per distinct device id. After each configuration the deployment's
store is opened afresh and its certificates counted, to show that every certificate returned was
also recorded. The raw cert-build rate of cryptography is measured just before each configuration.

Run: ``.venv/bin/python bench/km_throughput.py [--quick] [--duration S] [--connections N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field

from common import (
    DTYPE,
    Baseline,
    BenchDeployment,
    Headline,
    Summary,
    baseline_table,
    bench_deployment,
    cpu_meter,
    csr_der,
    device_keys,
    emit,
    loadavg,
    log,
    md_table,
    measure_baseline,
    ms,
    parse_args,
    rate,
    raw_cert_rate,
)
from iotdlm.client.km import KmClient
from iotdlm.errors import IotdlmError
from iotdlm.wire import km as msg

PROFILE = "factory"
TARGET = 2500.0
#: request loops per connection for each batch size (so enough work is in flight to fill 2 workers)
IN_FLIGHT = {1: 8, 10: 2, 100: 1}


class Pool:
    """Pre-made device CSRs, handed out in order; wraps around (a device re-provisioned) when exhausted."""

    def __init__(self, size: int, keys: int = 256) -> None:
        ks = device_keys(keys)
        self.items = [
            msg.IssueItem(device_id=d, profile=PROFILE, csr=csr_der(ks[i % keys], d))
            for i, d in enumerate(f"{DTYPE}-{i:07d}" for i in range(size))
        ]
        self.pos = 0
        self.handed = 0

    def take(self, n: int) -> list[msg.IssueItem]:
        out = []
        for _ in range(n):
            out.append(self.items[self.pos])
            self.pos = (self.pos + 1) % len(self.items)
        self.handed += n
        return out


@dataclass
class Phase:
    certs: int = 0
    errors: int = 0
    first_error: str = ""
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0


async def _loop(client: KmClient, pool: Pool, batch: int, deadline: float, phase: Phase) -> None:
    while time.perf_counter() < deadline:
        items = pool.take(batch)
        t0 = time.perf_counter()
        try:
            if batch == 1:
                (it,) = items
                await client.issue(it.device_id, it.profile, csr=it.csr)
                got = 1
            else:
                results = await client.issue_batch(items)
                got = sum(1 for r in results if r.certificate is not None)
                bad = [r for r in results if r.certificate is None]
                if bad:
                    phase.errors += len(bad)
                    phase.first_error = phase.first_error or f"{bad[0].device_id}: {bad[0].error}"
        except IotdlmError as exc:
            phase.errors += batch
            phase.first_error = phase.first_error or f"{exc.code}: {exc.message}"
            continue
        phase.latencies.append(time.perf_counter() - t0)
        phase.certs += got


async def _phase(clients: list[KmClient], pool: Pool, batch: int, seconds: float) -> Phase:
    phase = Phase()
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(
        *(_loop(c, pool, batch, deadline, phase) for c in clients for _ in range(IN_FLIGHT.get(batch, 1)))
    )
    phase.elapsed = time.perf_counter() - start  # includes draining the requests in flight at the deadline
    return phase


@dataclass
class Result:
    workers: int
    batch: int
    connections: int
    loops: int
    phase: Phase
    raw_cert: float
    km_cpu: float
    nats_cpu: float
    pm_cpu: float
    stored: int
    returned: int
    load: str

    @property
    def rate(self) -> float:
        return self.phase.certs / self.phase.elapsed


async def run_config(
    bd: BenchDeployment,
    pool: Pool,
    workers: int,
    batch: int,
    connections: int,
    seconds: float,
    warmup: float,
    *,
    raw_seconds: float = 0.5,
) -> Result:
    clients = [await bd.pm_client() for _ in range(connections)]
    before = bd.count_certificates()
    warm = await _phase(clients, pool, batch, warmup)
    raw = raw_cert_rate(raw_seconds)
    load = loadavg()
    assert bd.server.pid is not None
    with cpu_meter([*bd.worker_pids(), bd.server.pid]) as cpu_all, cpu_meter([bd.server.pid]) as cpu_nats:
        phase = await _phase(clients, pool, batch, seconds)
    stored = bd.count_certificates() - before
    for c in clients:
        await bd.close_bus(c.bus)
    return Result(
        workers=workers,
        batch=batch,
        connections=connections,
        loops=connections * IN_FLIGHT.get(batch, 1),
        phase=phase,
        raw_cert=raw,
        km_cpu=cpu_all["pids"] - cpu_nats["pids"],
        nats_cpu=cpu_nats["pids"],
        pm_cpu=cpu_all["self"],
        stored=stored,
        returned=warm.certs + phase.certs,
        load=load,
    )


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, help="seconds per configuration (default 10, --quick 1.5)")
    p.add_argument("--connections", type=int, default=4, help="pm NATS connections (default 4)")
    p.add_argument("--workers", type=int, nargs="+", default=[2, 1], help="km worker counts (default: 2 1)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 10, 100], help="batch sizes (default: 1 10 100)")


async def run(args: argparse.Namespace) -> tuple[str, list[Headline]]:
    quick: bool = args.quick
    seconds = args.duration or (1.5 if quick else 10.0)
    warmup = 0.3 if quick else 1.0
    log(f"throughput: baseline (load {loadavg()})")
    base_start = measure_baseline(quick)
    pool_size = 3000 if quick else 30000
    log(f"throughput: pre-generating {pool_size} device CSRs (not timed)")
    t = time.perf_counter()
    pool = Pool(pool_size)
    log(f"throughput: pool ready in {time.perf_counter() - t:.1f} s")
    results: list[Result] = []
    async with bench_deployment(workers=0) as bd:
        for workers in args.workers:
            await bd.set_workers(workers)
            for batch in args.batches:
                log(f"throughput: {workers} worker(s), batch {batch}, {seconds} s (load {loadavg()})")
                r = await run_config(
                    bd, pool, workers, batch, args.connections, seconds, warmup, raw_seconds=0.05 if quick else 0.5
                )
                log(f"throughput: -> {r.rate:,.0f} certificates/s ({r.phase.errors} errors)")
                results.append(r)
        total_stored = bd.count_certificates(profile=PROFILE)
        db_bytes = bd.db_size()
    base_end = measure_baseline(quick)
    return render(quick, seconds, pool, results, total_stored, db_bytes, base_start, base_end)


def render(
    quick: bool,
    seconds: float,
    pool: Pool,
    results: list[Result],
    total_stored: int,
    db_bytes: int,
    base_start: Baseline,
    base_end: Baseline,
) -> tuple[str, list[Headline]]:
    rows = []
    for r in results:
        lat = Summary.of(r.phase.latencies) if r.phase.latencies else None
        per = 1000.0 / max(r.phase.certs, 1)
        rows.append(
            [
                r.workers,
                "1 (`issue`)" if r.batch == 1 else f"{r.batch} (`issue_batch`)",
                f"{r.connections} x {r.loops // r.connections}",
                f"{r.phase.elapsed:.1f}",
                f"{r.phase.certs:,}",
                f"**{rate(r.rate)}**",
                ms(lat.p50) if lat else "-",
                ms(lat.p95) if lat else "-",
                f"{r.km_cpu * per:.2f}",
                f"{r.km_cpu / r.phase.elapsed:.2f}",
                f"{r.nats_cpu * per:.3f}",
                f"{r.pm_cpu * per:.2f}",
                rate(r.raw_cert),
                f"{r.rate / r.raw_cert:.0%}",
                f"{r.stored:,} / {r.returned:,}",
                r.phase.errors,
                r.load,
            ]
        )
    two = [r for r in results if r.workers == 2]
    best = max(two or results, key=lambda r: r.rate)
    errors = [r for r in results if r.phase.errors]
    missing = [r for r in results if r.stored != r.returned]
    notes = [
        f"- Best with {best.workers} km worker(s): **{rate(best.rate)} certificates/s** (batch {best.batch}); "
        f"target >= {TARGET:,.0f}/s **{'met' if best.rate >= TARGET else 'missed'}** "
        f"({best.rate / TARGET:.0%} of it). The raw single-thread cert-build rate just before was "
        f"{rate(best.raw_cert)}/s, so 2 workers on 2 cores could at most reach about "
        f"{rate(2 * best.raw_cert)}/s if nothing but signing mattered.",
        "- Persistence: `stored / returned` is the growth of the store's certificate count during the "
        "configuration (warm-up included) against the certificates pm got back; "
        + (
            "they match for every configuration."
            if not missing
            else f"**they differ for {len(missing)} configuration(s)**."
        )
        + f" At the end the store held {total_stored:,} `{PROFILE}` certificates ({db_bytes / 1e6:.1f} MB "
        "of SQLite files).",
        f"- Device CSRs: {len(pool.items):,} distinct device ids made before timing and handed out in order; "
        f"{pool.handed:,} requests in all, so after the first {len(pool.items):,} a device id comes round "
        "again (the device is re-provisioned: a new certificate and serial, same device row).",
        "- CPU columns are CPU milliseconds per certificate: all km worker processes, nats-server, and "
        "this process (pm: signing each request with ES256, encoding, decoding replies). On 2 cores the "
        "sum bounds the rate: 2000 ms/s divided by the sum is the best this split of work could do.",
        f"- Why the target is missed (2 workers, batch {best.batch}): km used {best.km_cpu / best.phase.elapsed:.2f} "
        f"of the 2 cores (`km cores busy`) at {best.km_cpu * 1000 / max(best.phase.certs, 1):.2f} ms of CPU per "
        f"certificate, against {1000 / best.raw_cert:.2f} ms for cryptography to build and sign one. So two "
        "things: each certificate costs several times the signing (the store does one read and one write "
        "transaction per certificate), and the workers do not fill the cores (they queue for SQLite's single "
        "write lock, and inside one process the GIL). See the profile section for the breakdown."
        if best.rate < TARGET
        else "- The target is met.",
        "- `km cores busy`: CPU seconds of all km workers per second of the run (2.00 = both cores).",
        "- `loops`: connections x request loops per connection, each loop waits for its answer before "
        "sending the next request.",
    ]
    if errors:
        notes.append(f"- **Errors** in {len(errors)} configuration(s); first: {errors[0].phase.first_error}")
    if quick:
        notes.insert(0, "- **--quick run: a smoke test, not figures.**")
    heads = []
    for w in sorted({r.workers for r in results}, reverse=True):
        rs = [r for r in results if r.workers == w]
        b = max(rs, key=lambda r: r.rate)
        heads.append(
            Headline(
                what=f"Sustained issuance, {w} km worker(s), persisted (best batch size: {b.batch})",
                paper="- (Fig. 12: ~11/s)",
                target=">= 2,500/s" if w == 2 else "-",
                measured=f"{rate(b.rate)} certificates/s (raw cert-build {rate(b.raw_cert)}/s per thread)",
                verdict=("**met**" if b.rate >= TARGET else "missed") if w == 2 else "-",
            )
        )
    for batch, bound in ((1, 0.25), (100, 0.6)):  # issue 15's two ratio targets, 2 workers
        r = next((r for r in results if r.workers == 2 and r.batch == batch and r.raw_cert), None)
        if r is not None:
            heads.append(
                Headline(
                    what=f"Sustained issuance, 2 km workers, batch size {batch} / raw one-thread build+sign",
                    paper="-",
                    target=f">= {bound}x",
                    measured=f"{rate(r.rate)} certificates/s (raw cert-build {rate(r.raw_cert)}/s per thread)",
                    verdict="met" if r.rate / r.raw_cert >= bound else "missed",
                    yardstick="raw cert-build, one thread",
                    ratio=round(r.rate / r.raw_cert, 3),
                )
            )
    section = "\n".join(
        [
            "## Sustained issuance throughput (km over NATS, persisted)",
            "",
            f"Target: >= {TARGET:,.0f} certificates/s with 2 km workers on a 2-core machine. Paper: no "
            "throughput figure (Fig. 12's 100 certificates in 9.2 s is about 11 certificates/s). Profile "
            f"`{PROFILE}`, P-256, PKCS#10 CSRs, SQLite store under the deployment, {seconds:g} s per "
            "configuration after a warm-up.",
            "",
            md_table(
                [
                    "km workers",
                    "batch size",
                    "connections x loops",
                    "s",
                    "certificates",
                    "certs/s",
                    "req p50 ms",
                    "req p95 ms",
                    "km CPU ms/cert",
                    "km cores busy",
                    "nats CPU ms/cert",
                    "pm CPU ms/cert",
                    "raw cert-build/s (1 thread)",
                    "vs raw",
                    "stored / returned",
                    "errors",
                    "load avg",
                ],
                rows,
            ),
            "",
            baseline_table(base_start, base_end),
            "",
            *notes,
        ]
    )
    return section, heads


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    section, heads = asyncio.run(run(args))
    emit(section, args, heads)


if __name__ == "__main__":
    main()
