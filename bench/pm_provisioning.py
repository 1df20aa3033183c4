"""pm provisioning throughput: a line of simulated blank devices, end to end.

Target: 1,000 devices with a 1 MiB image and two certificates each (factory + operational) in
<= 30 s on 2 cores. Paper: no throughput figure (Fig. 12: one certificate in ~0.18 s).

Everything is real: a deployment in a temporary folder (P-256, SQLite under the deployment), the
embedded nats-server with one user per module, km as its own OS process(es)
(``python -m iotdlm.cli.main km serve``, which checks the operation mode itself), sm (in this
process, on NATS as ``sm``) having stored the image from a vendor repository served on loopback
(Algorithm 2), and pm -- the ``Provisioner`` that ``iotdlm pm provision`` runs -- connecting as
``pm-<dtype>`` and held to the operation mode. The line runs as Table 1 says, in two passes:

1. mode provisioning-software: Algorithm 1 on pm's staged copy, then the image and the config
   flashed into every device;
2. mode provisioning-certificate: km's chain, one signed batch request per profile per 100 devices,
   the truststore and the certificates flashed, then everything read back and verified (RFC 5280
   path validation through the device's truststore, key match, image SHA-256).

One store write per 100 devices per pass and step. Half the devices make their own CSR (Fig. 4),
half only hand over their public key and pm builds CRMF with raVerified (Fig. 5). Device
manufacturing and the mode switch are not timed; the devices' key generation is (it happens during
provisioning, on the device). The mode is published as the supervisor does; km and sm keep running
through both passes (the supervisor would stop km in pass 1 and sm in pass 2: pm does not ask them).

Run: ``.venv/bin/python bench/pm_provisioning.py [--quick] [--devices N] [--workers N] [--concurrency N]``.
``--quick``: 40 devices.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import (
    DTYPE,
    BenchDeployment,
    Headline,
    baseline_table,
    bench_deployment,
    cpu_meter,
    emit,
    loadavg,
    log,
    md_table,
    measure_baseline,
    parse_args,
)
from iotdlm.bus import subjects
from iotdlm.bus.api import KeyValue
from iotdlm.clock import SystemClock
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.modes.guard import ModeGuard
from iotdlm.modes.signed import ModeVerifier, seal_record
from iotdlm.modes.table import Mode
from iotdlm.pm import config as pmconfig
from iotdlm.pm.flasher import SimulatedFlasher
from iotdlm.pm.provisioner import Provisioner
from iotdlm.repository import VendorRepository
from iotdlm.repository.server import RepositoryServer
from iotdlm.runtime import connect_identity, sealer_for
from iotdlm.sm import HttpFetcher
from iotdlm.sm import config as smconfig
from iotdlm.sm.service import SmService
from iotdlm.wire import pm as m
from iotdlm.wire.envelope import Sealer
from iotdlm.wire.modes import ModeRecord

TARGET_DEVICES = 1000
TARGET_SECONDS = 30.0
IMAGE_BYTES = 1024 * 1024
PHASES = (
    ("algorithm1", "Algorithm 1 (once): stage the image, decrypt meta, verify sig_sm, meta_repo, hash"),
    ("device_requests", "devices make key + CSR / hand over public key; pm builds CRMF"),
    ("km", "waiting for km (signed batch requests, one per profile per 100 devices)"),
    ("flash_software", "flashing the 1 MiB image"),
    ("flash_other", "flashing truststore, config, certificates"),
    ("verify", "reading back and verifying (truststore, chains, key, image SHA-256)"),
    ("store", "provisioning records (two writes per 100 devices per pass)"),
)


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=int, default=TARGET_DEVICES, help="devices on the line (--quick: 40)")
    p.add_argument("--workers", type=int, default=1, help="km worker processes")
    p.add_argument("--concurrency", type=int, default=4, help="devices pm flashes at once (threads)")
    p.add_argument("--batch", type=int, default=100, help="devices per chunk (one km request per profile)")


async def _sm(bd: BenchDeployment, tmp: Path, stack: contextlib.AsyncExitStack) -> str:
    """The vendor repository on loopback; sm stores the image (Algorithm 2) and serves pm."""
    now = bd.clock.now()
    ca = tmp / "service-ca.pem"
    ca.write_bytes((bd.dep.root / "ca" / "service.pem").read_bytes())
    repo = VendorRepository.init(tmp / "repo", now=now, report_ca=ca)
    image = tmp / "fw.bin"
    image.write_bytes(os.urandom(IMAGE_BYTES))
    published = repo.publish(DTYPE, 1, image, now=now, name="fw.bin")
    server = await stack.enter_async_context(RepositoryServer(repo))
    smconfig.setup(bd.dep.root, repository_url=server.url, root=repo.trusted_root(), dtypes=[DTYPE])
    manager = smconfig.build(bd.dep.root, fetcher=HttpFetcher(), clock=SystemClock())
    result = await asyncio.to_thread(manager.check, DTYPE)
    if result.outcome != "stored":
        raise RuntimeError(f"sm did not store the image: {result}")
    sm_bus, _ = await connect_identity(bd.dep, "sm")
    bd.buses.append(sm_bus)
    service = SmService(manager, sm_bus, dtypes=[DTYPE], poll_interval=None)
    await service.start()
    stack.push_async_callback(service.stop)
    return published.sha256


@dataclass
class ModeBucket:
    """The mode bucket and the supervisor's signing identity (the record is signed, issue 11)."""

    kv: KeyValue
    sealer: Sealer


async def mode_bucket(bd: BenchDeployment) -> ModeBucket:
    """The mode bucket, written as the supervisor (the ``modes`` identity) writes it."""
    bus, ident = await connect_identity(bd.dep, "modes")
    bd.buses.append(bus)
    return ModeBucket(await bus.key_value(subjects.MODE_BUCKET, create=True), sealer_for(ident))


async def set_mode(kv: ModeBucket, guard: ModeGuard, mode: Mode) -> None:
    now = dt.datetime.now(dt.UTC)
    record = ModeRecord(mode=mode, since=now.isoformat(timespec="seconds"), by="bench")
    await kv.kv.put(subjects.MODE_KEY, seal_record(kv.sealer, record, now=now))
    await guard.wait_for(mode)
    await asyncio.sleep(0.3)  # km's own guard sees it too (a real switch stops and starts processes)


async def provision_line(
    pm: Provisioner, guard: ModeGuard, kv: ModeBucket
) -> tuple[list[m.ProvisionReport], list[float]]:
    """Table 1: pass 1 in provisioning-software, pass 2 in provisioning-certificate."""
    reports, walls = [], []
    for mode in (Mode.PROVISIONING_SOFTWARE, Mode.PROVISIONING_CERTIFICATE):
        await set_mode(kv, guard, mode)
        t0 = time.perf_counter()
        reports.append(await pm.provision_batch(None, "bench"))
        walls.append(time.perf_counter() - t0)
    return reports, walls


def merged_timings(reports: list[m.ProvisionReport]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in reports:
        for k, v in r.timings.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _manufacture(bench: Path, n: int) -> None:
    for i in range(n):
        dev_id = f"{DTYPE}-{i:06d}"
        SimulatedDevice.manufacture(bench / dev_id, dev_id, DTYPE, can_make_csr=i % 2 == 0)


async def run(args: argparse.Namespace) -> tuple[str, list[Headline]]:
    n = 40 if args.quick else args.devices
    log(f"pm_provisioning: baseline (load {loadavg()})")
    base_start = measure_baseline(args.quick)
    with tempfile.TemporaryDirectory(prefix="iotdlm-bench-pm-") as tmp_name:
        tmp = Path(tmp_name)
        async with bench_deployment(workers=args.workers) as bd, contextlib.AsyncExitStack() as stack:
            sha = await _sm(bd, tmp, stack)
            bench = tmp / "bench"
            log(f"pm_provisioning: manufacturing {n} blank devices (not timed)")
            await asyncio.to_thread(_manufacture, bench, n)
            store = pmconfig.open_store(bd.dep)
            bus = await pmconfig.connect_pm(bd.dep, DTYPE)
            bd.buses.append(bus)
            kv = await mode_bucket(bd)
            config = pmconfig.PmConfig(batch_size=args.batch, concurrency=args.concurrency)
            flasher = SimulatedFlasher(bench, DTYPE)
            log(f"pm_provisioning: provisioning {n} devices (load {loadavg()})")
            async with ModeGuard(bus, ModeVerifier.for_deployment(bd.dep)) as guard, pmconfig.build_provisioner(
                bd.dep, DTYPE, bus=bus, store=store, flasher=flasher, clock=SystemClock(), config=config,
                guard=guard, require_mode=True,
            ) as pm:  # fmt: skip
                with cpu_meter(bd.worker_pids()) as cpu:
                    reports, walls = await provision_line(pm, guard, kv)
            store.close()
            wall = sum(walls)
            software, certificates = reports
            complete = certificates.count(m.COMPLETE)
            crmf = sum(1 for d in certificates.devices if d.request == "crmf")
            if software.count(m.IN_PROGRESS) != n or complete != n or software.image_sha256 != sha:
                bad = [*software.failures, *certificates.failures][:3]
                raise RuntimeError(f"only {complete}/{n} devices complete: {bad}")
            km_cpu, pm_cpu = cpu["pids"], cpu["self"]
            timings = merged_timings(reports)
    base_end = measure_baseline(args.quick)
    log(f"pm_provisioning: {n} devices in {wall:.1f} s")

    rate = n / wall
    projected = TARGET_DEVICES / rate
    verdict = "met" if projected <= TARGET_SECONDS else "missed"
    summary = md_table(
        ["", ""],
        [
            ["devices", f"{n} ({n - crmf} make their CSR, {crmf} CRMF raVerified by pm)"],
            ["per device", "1 MiB image, truststore (4 CA certificates), config, factory + operational certificates"],
            ["km worker processes", str(args.workers)],
            ["pm threads / chunk", f"{args.concurrency} / {args.batch} devices"],
            [
                "wall time",
                f"**{wall:.2f} s** (provisioning-software {walls[0]:.2f} s + "
                f"provisioning-certificate {walls[1]:.2f} s)",
            ],
            ["throughput", f"**{rate:,.1f} devices/s** ({2 * rate:,.0f} certificates/s)"],
            ["1,000 devices at this rate", f"{projected:.1f} s (target <= {TARGET_SECONDS:.0f} s: {verdict})"],
            ["CPU: km worker(s)", f"{km_cpu:.2f} s"],
            ["CPU: this process (pm, sm, nats client)", f"{pm_cpu:.2f} s"],
        ],
    )
    rows = []
    for key, what in PHASES:
        t = timings.get(key, 0.0)
        rows.append([f"`{key}`", what, f"{t:.2f}", f"{1000 * t / n:.2f}"])
    breakdown = md_table(["phase", "what", "seconds (summed over threads)", "ms per device"], rows)
    section = "\n\n".join(
        [
            "## pm: provisioning a line (throughput)",
            f"Target: {TARGET_DEVICES:,} devices with a 1 MiB image and factory + operational certificates in "
            f"<= {TARGET_SECONDS:.0f} s on 2 cores. Paper: no figure. Method: see `bench/pm_provisioning.py` "
            "(real NATS, km as its own process, sm serving a verified image, two passes as Table 1 says -- "
            "software in provisioning-software, certificates in provisioning-certificate -- every device read "
            "back and verified).",
            summary,
            "Where the time goes (pm's worker threads overlap, so the phases add up to more than the wall time; "
            "`km` is pm waiting on km's answers, the certificates being signed in the km process):",
            breakdown,
            baseline_table(base_start, base_end),
        ]
    )
    head = Headline(
        what=f"pm provisioning, {n} devices, 1 MiB image, 2 certificates each, {args.workers} km worker(s)",
        paper="-",
        target=f"1,000 in <= {TARGET_SECONDS:.0f} s",
        measured=f"{rate:,.1f} devices/s ({wall:.1f} s; 1,000 in {projected:.1f} s)",
        verdict=verdict,
    )
    return section, [head]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    section, heads = asyncio.run(run(args))
    emit(section, args, heads)


if __name__ == "__main__":
    main()
