"""The paper's Fig. 11 end to end through pm: 500 devices that make their own CSR (Fig. 4) against
500 devices that only hand over their public key, for which pm builds CRMF with raVerified (Fig. 5).

``bench/fig11_csr_vs_crmf.py`` times the request formats alone. Here each group is provisioned by
the real ``Provisioner`` (as ``iotdlm pm provision`` runs it) on the embedded nats-server, with km as
its own process and sm serving a verified 1 MiB image: software, truststore, config, a factory
certificate, read-back verification. pm runs one worker thread, so the per-device figures are not
blurred by threads waiting on each other; the devices are simulated on this machine (the paper's
devices were Raspberry Pi 4s, so only the shape of the comparison carries over).

- ``device_requests``: what it costs to get each device's request: for a CSR device, the device
  makes its key and signs a PKCS#10 CSR; for the other, the device makes its key and exports the
  public key, and pm builds the CRMF request;
- ``km``: pm waiting for km's batch answers (one request per 100 devices);
- the whole provisioning of the group (wall time of both passes: provisioning-software, then
  provisioning-certificate, as Table 1 says).

Run: ``.venv/bin/python bench/fig11_device_vs_pm.py [--quick]`` (``--quick``: 50 of each).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
from pathlib import Path

from common import (
    DTYPE,
    Headline,
    baseline_table,
    bench_deployment,
    emit,
    loadavg,
    log,
    md_table,
    measure_baseline,
    parse_args,
)
from iotdlm.clock import SystemClock
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.modes.guard import ModeGuard
from iotdlm.modes.signed import ModeVerifier
from iotdlm.pm import config as pmconfig
from iotdlm.pm.flasher import SimulatedFlasher
from iotdlm.wire import pm as m
from pm_provisioning import _sm, merged_timings, mode_bucket, provision_line

N = 500
KINDS = (("CSR made on the device (Fig. 4)", True), ("CRMF raVerified made by pm (Fig. 5)", False))


async def run(args: argparse.Namespace) -> tuple[str, list[Headline]]:
    n = 50 if args.quick else N
    log(f"fig11 via pm: baseline (load {loadavg()})")
    base_start = measure_baseline(args.quick)
    rows = []
    per_device: dict[bool, float] = {}
    with tempfile.TemporaryDirectory(prefix="iotdlm-bench-fig11pm-") as tmp_name:
        tmp = Path(tmp_name)
        async with bench_deployment(workers=1) as bd, contextlib.AsyncExitStack() as stack:
            await _sm(bd, tmp, stack)
            store = pmconfig.open_store(bd.dep)
            bus = await pmconfig.connect_pm(bd.dep, DTYPE)
            bd.buses.append(bus)
            kv = await mode_bucket(bd)
            config = pmconfig.PmConfig(profiles=["factory"], batch_size=100, concurrency=1)
            for label, csr in KINDS:
                bench = tmp / f"bench-{'csr' if csr else 'crmf'}"
                for i in range(n):
                    dev_id = f"{DTYPE}-{'c' if csr else 'k'}{i:05d}"
                    SimulatedDevice.manufacture(bench / dev_id, dev_id, DTYPE, can_make_csr=csr)
                log(f"fig11 via pm: {label}: {n} devices (load {loadavg()})")
                async with ModeGuard(bus, ModeVerifier.for_deployment(bd.dep)) as guard, pmconfig.build_provisioner(
                    bd.dep, DTYPE, bus=bus, store=store, flasher=SimulatedFlasher(bench, DTYPE), clock=SystemClock(),
                    config=config, guard=guard, require_mode=True,
                ) as pm:  # fmt: skip
                    reports, walls = await provision_line(pm, guard, kv)
                wall = sum(walls)
                report = reports[-1]
                if report.count(m.COMPLETE) != n:
                    raise RuntimeError(f"{label}: only {report.count(m.COMPLETE)}/{n} complete: {report.failures[:3]}")
                timings = merged_timings(reports)
                req = timings.get("device_requests", 0.0)
                per_device[csr] = req / n
                rows.append(
                    [
                        label,
                        str(n),
                        f"{req:.3f}",
                        f"{1000 * req / n:.3f}",
                        f"{timings.get('km', 0.0):.3f}",
                        f"{wall:.2f}",
                        f"{n / wall:,.1f}",
                    ]
                )
            store.close()
    base_end = measure_baseline(args.quick)
    ratio = per_device[True] / per_device[False] if per_device[False] else float("nan")
    table = md_table(
        [
            "group",
            "devices",
            "getting the requests (s)",
            "per device (ms)",
            "waiting for km (s)",
            "whole provisioning (s)",
            "devices/s",
        ],
        rows,
    )
    section = "\n\n".join(
        [
            "## Fig. 11 through pm: CSR devices vs CRMF-by-pm devices, end to end",
            "Paper: 500 CSRs made on a Raspberry Pi 4 vs 500 CRMF requests made by pm on an i7: about 20x. "
            "Here both groups run on this machine through the whole provisioning (factory certificate only, "
            "one pm thread); see `bench/fig11_device_vs_pm.py`.",
            table,
            f"Getting a CSR device's request costs **{ratio:.1f}x** what pm's CRMF path costs per device (the "
            "device signs its CSR; pm's raVerified request needs no signature). Both groups generate their key "
            "on the device. Against the whole provisioning (flashing 1 MiB, verifying) the difference is small.",
            baseline_table(base_start, base_end),
        ]
    )
    head = Headline(
        what=f"Fig. 11 via pm: request per device, CSR on device vs CRMF by pm ({n} each)",
        paper="~20x (Pi 4 vs i7)",
        target="-",
        measured=f"{1000 * per_device[True]:.2f} ms vs {1000 * per_device[False]:.2f} ms ({ratio:.1f}x)",
        verdict="-",
    )
    return section, [head]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    section, heads = asyncio.run(run(args))
    emit(section, args, heads)


if __name__ == "__main__":
    main()
