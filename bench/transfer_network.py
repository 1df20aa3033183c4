"""Issue 13: the trust transfer of N simulated devices end to end over the network, with the raw
library costs (COSE/CWT verify, certificate build + sign) measured in the same run.

Two deployments on loopback, each with its own nats-server, km (wired as ``iotdlm km serve`` wires
it) and cm (HTTPS) -- the very setup of tests/scenarios/test_transfer_network.py (``open_side``,
reused, not copied). The fleet is ``fleet run``'s code in this process (each device its own keys,
state and HTTPS connections; 32 passes at once). The operators' steps are the CLI as
docs/operations.md section 10 writes them. Timed, each phase and the total:

1. SP1 ``transfer export --serve`` (signed UpdateInfoList, kept for SP2 at SP1's cm);
2. SP2 ``transfer accept --from --send`` (fetch it over HTTPS, verify, register the x5bag with CA2,
   sign the TransferMessage and send it to SP1's cm);
3. SP1 ``transfer deliver`` (one CWT per device, waiting at SP1's cm);
4. the devices' pass: fetch + verify the message at SP1's cm, reset, SP2's anchors, attest at SP2's
   raURI (unless ``--no-attest``), re-enroll with CA2 for a NEW key (EST), commit;
5. SP2 ``transfer confirm --send`` and CA1 revoking every old operational certificate.

Setup (manufacturing, CA1 enrollment of the fleet over EST) is reported apart, not in the total.
Baselines, same run: ``cose.verify_sign1`` of a real per-device message (pycose/cwt as our code
uses it) and cryptography's ``CertificateBuilder.sign`` of a km-like certificate (bench/common.py).

Run: ``PYTHONPATH=src .venv/bin/python bench/transfer_network.py [--quick] [--devices N] [--no-attest]``
(default 10,000 devices; --quick 200). Nothing here asserts anything about time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import dataclasses
import io
import json
import os
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

import fleet_profile
from common import REPO, Headline, emit, log, machine_info, md_table, ms, parse_args, raw_cert_rate
from transfer import verify_costs

sys.path.insert(0, str(REPO))  # the scenario's two-deployment setup lives with the tests

import tests.scenarios.test_transfer_network as scenario
from tests.integration.test_cm import ShiftClock
from tests.scenarios.test_transfer_network import (
    FIRMWARE,
    PW,
    SP1_ID,
    SP2_ID,
    cli,
    open_side,
)

from iotdlm.cli.fleet import ready_devices
from iotdlm.cli.fleet_workers import FleetPlan, default_workers, run_devices
from iotdlm.clock import SystemClock
from iotdlm.cm.config import Limits
from iotdlm.deployment import PASSPHRASE_ENV
from iotdlm.pki.chain import certs_to_pem
from iotdlm.transfer import status as st

#: cm with its default limits: the scenario's short test limits (keep-alive 0.5 s, TLS handshake
#: 2 s) close the devices' kept-open connections and refuse handshakes queued behind a busy loop
scenario.LIMITS = Limits()
#: where ``--profile`` leaves the cProfile files (servers.prof, devices.prof) for pstats/snakeviz
PROFILE_OUT = Path(tempfile.gettempdir())


async def run(
    tmp: Path,
    fleet_dir: Path,
    n: int,
    *,
    attest: bool,
    profile: bool,
    workers: int,
    spy_on: bool,
    quick: bool = False,
) -> tuple[str, list[Headline]]:
    os.environ[PASSPHRASE_ENV] = PW
    clock, real = ShiftClock(), SystemClock()
    async with (
        open_side(tmp / "sp1", "SP1", SP1_ID, clock) as sp1,
        open_side(tmp / "sp2", "SP2", SP2_ID, clock, register=sp1) as sp2,
    ):
        sp1_cert, sp2_cert, sp1_root = tmp / "sp1-transfer.pem", tmp / "sp2-transfer.pem", tmp / "root.pem"
        sp1_cert.write_bytes(certs_to_pem([sp1.identity.certificate]))
        sp2_cert.write_bytes(certs_to_pem([sp2.identity.certificate]))
        sp1_root.write_bytes(certs_to_pem([sp1.dep.ca_certificate("root")]))
        fw = tmp / "fw.bin"
        fw.write_bytes(FIRMWARE)

        # --- setup, not timed: the fleet manufactured and enrolled with CA1 over EST (fleet run) ----------
        t0 = time.perf_counter()
        paths = [fleet_dir / f"sim-{i:05d}" for i in range(n)]
        devices = await asyncio.to_thread(ready_devices, paths, dtype="sensor", data=sp1.dep.root, cm=sp1.url,
                                          clock=real)  # fmt: skip
        for dev in devices:
            dev.write_image("slot-a", fw, {"version": "4.1"})
        plan = FleetPlan(renew_at=2 / 3, timeout=120.0, once=True, interval=1.0, retry_delay=0.2)
        summary = await run_devices(paths, plan, workers=workers, progress=False)
        if summary.counts != {"enrolled": n}:
            raise RuntimeError(f"setup: not every device enrolled with CA1: {summary.counts}")
        setup = time.perf_counter() - t0
        log(f"setup: {n} devices enrolled with CA1 over EST in {setup:.1f}s")
        ids = [d.device_id for d in devices]
        fleet_file = tmp / "fleet.txt"
        fleet_file.write_text("\n".join(ids) + "\n")

        phases: list[tuple[str, float]] = []
        spy_table = ""

        def mark(name: str, since: float) -> float:
            now = time.perf_counter()
            phases.append((name, now - since))
            log(f"{name}: {now - since:.2f}s")
            return now

        t = time.perf_counter()
        said = await cli(
            "transfer", "export", "--data", str(sp1.dep.root), "--peer-id", SP2_ID, "--peer-cert", str(sp2_cert),
            "--devices-file", str(fleet_file), "--reference", str(fw), "--serve",
        )  # fmt: skip
        tid = said.split("transfer ")[1].split(":")[0].strip()
        t = mark("SP1 `export --serve`: sign the UpdateInfoList, keep it at SP1's cm", t)
        ra = ["--ra-uri", f"{sp2.url}/transfer/attestation"] if attest else []
        said = await cli("transfer", "accept", "--data", str(sp2.dep.root), "--from", sp1.url, "--transfer", tid,
                         "--cacert", str(sp1_root), "--peer-id", SP1_ID, "--peer-cert", str(sp1_cert), *ra,
                         "--send")  # fmt: skip
        t = mark("SP2 `accept --from --send`: fetch + verify it, x5bag to CA2, TransferMessage to SP1's cm", t)
        said = await cli("transfer", "deliver", "--data", str(sp1.dep.root), "--transfer", tid)
        t = mark("SP1 `deliver`: one signed CWT per device, waiting at SP1's cm", t)
        prof = cProfile.Profile() if profile else None
        if prof is not None:
            prof.enable()
        spy = fleet_profile.spy_start(tmp / "spy.txt") if spy_on else None
        t = time.perf_counter()  # (py-spy attached: not part of the pass)
        cpu0 = _cpu_seconds()
        if profile:
            (tmp / "prof").mkdir()
            plan = dataclasses.replace(plan, profile_dir=tmp / "prof")
        summary = await run_devices(paths, plan, workers=workers, progress=False)
        worker_profiles = sorted((tmp / "prof").glob("*.prof")) if profile else []
        if worker_profiles:
            pstats.Stats(*map(str, worker_profiles)).dump_stats(str(PROFILE_OUT / "devices.prof"))
        cpu_parent, cpu_workers = (b - a for a, b in zip(cpu0, _cpu_seconds(), strict=True))
        t_end = time.perf_counter()
        pass_seconds = t_end - t
        if spy is not None:
            fleet_profile.spy_stop(spy)
            spy_table = fleet_profile.breakdown(tmp / "spy.txt", n, pass_seconds)
        if prof is not None:
            prof.disable()
        committed = summary.counts.get("transfer-committed", 0)
        for device_id, report in sorted(summary.devices.items()):
            for e in report.errors:
                log(f"device {device_id}: {e}")
        what = "attest at SP2's raURI, " if attest else ""
        where = f"{workers} worker processes" if workers > 1 else "in the servers' process"
        steps = f"fetch + verify, reset, {what}re-enroll with CA2 (new key), commit"
        mark(f"devices (HTTPS, {where}, 32 at once each): {steps}", t + (time.perf_counter() - t_end))
        t = time.perf_counter()
        said = await cli("transfer", "confirm", "--data", str(sp2.dep.root), "--transfer", tid, "--send", sp1.url,
                         "--cacert", str(sp1_root))  # fmt: skip
        t = mark("SP2 `confirm --send`; CA1 revokes the old operational certificates", t)
        total = sum(sec for _name, sec in phases)
        rows = sp1.store.get_transfer_devices("sp1", tid, ids)
        revoked = sum(1 for r in rows.values() if r.status == st.REVOKED_AT_CA1)
        kept = json.loads(rows[ids[0]].detail)
        dev_msg = base64.b64decode(kept["message"]) if "message" in kept else None
        del said

    # --- the raw library baselines, same run ------------------------------------------------------------
    iterations = 50 if quick else 300 if n < 10_000 else 2000
    verify_table = ""
    if dev_msg is not None:
        verify_table = verify_costs(dev_msg, ids[0], [sp1.dep.ca_certificate("root"), *sp1.identity.chain], iterations)
    repeats = 1 if quick else 3  # a --quick run is a smoke run: one short repeat of each yardstick
    cert_rates = sorted(raw_cert_rate(0.05 if quick else 0.5) for _ in range(repeats))
    cert_ms = 1.0 / cert_rates[len(cert_rates) // 2]
    tls = sorted(fleet_profile.raw_tls_handshake_ms(20 if quick else 100) for _ in range(repeats))
    tls_ms = tls[len(tls) // 2] / 1000
    verify_ms = _cose_median(verify_table)

    table_rows = []
    for name, sec in phases:
        per = sec / n
        extra = ""
        if name.startswith("devices ("):
            extra = f"{per / cert_ms:.0f}x a raw cert sign; {per / tls_ms:.1f}x a raw mutual-TLS handshake" + (
                f"; {per / verify_ms:.0f}x a raw CWT verify" if verify_ms else ""
            )
        table_rows.append([name, f"{sec:.2f}", f"{per * 1000:.2f}", extra])
    table_rows.append([f"**total, {n} devices**", f"**{total:.1f}**", f"{total / n * 1000:.2f}",
                       f"{total / n / cert_ms:.0f}x a raw cert sign"])  # fmt: skip
    table = md_table(["phase", "seconds", "ms per device", "per device / raw library (same run)"], table_rows)
    table += (
        f"\n\nRaw library, same run: `CertificateBuilder.sign` (km-like certificate, one thread) "
        f"{ms(cert_ms)} ms ({1 / cert_ms:,.0f}/s, median of {repeats}); a mutual-TLS handshake (P-256, TLS 1.3, both "
        f"ends in memory, bench/fleet_profile.py) {tls_ms * 1000:.2f} ms; COSE_Sign1 verify of a per-device message "
        f"{verify_ms * 1000:.2f} ms (table below). Setup (not in the total): {n} devices manufactured and "
        f"enrolled with CA1 over EST in {setup:.1f} s. Committed at CA2: {committed}/{n}; revoked-at-CA1 at SP1: "
        f"{revoked}/{n}. CPU during the devices' pass: servers' process (both km, both cm) {cpu_parent:.1f} s "
        f"({cpu_parent / n * 1000:.1f} ms per device), device workers {cpu_workers:.1f} s "
        f"({cpu_workers / n * 1000:.1f} ms per device). "
        f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}."
    )
    if verify_table:
        table += "\n\n" + verify_table
    if spy_table:
        table += "\n\nWhere the CPU of the devices' pass goes:\n\n" + spy_table
    if prof is not None:
        prof.dump_stats(str(PROFILE_OUT / "servers.prof"))
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
        table += "\n\n<details><summary>cProfile of the device phase (cumulative top 25, own time top 15)</summary>"
        table += "\n\n```\n"
        table += out.getvalue().strip() + "\n```\n</details>"
    head = [
        Headline(
            what=f"trust transfer of {n} devices end to end over the network",
            paper="(not measured in the paper)",
            target="<= 60 s for 10,000 on 2 cores",
            measured=f"{total:.1f} s",
            verdict="met" if n >= 10_000 and total <= 60 else ("n/a (fewer devices)" if n < 10_000 else "missed"),
        )
    ]
    return table, head


def _flash_root() -> str | None:
    """Each simulated device's flash in memory where the machine has /dev/shm (it is not this
    machine's disk); the providers' stores stay on disk."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds of this process, of its children waited for) so far; the worker processes are
    children (the nats-servers are too, but they run until the end)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def _cose_median(verify_table: str) -> float:
    """The median seconds of the COSE-signature-only row of :func:`transfer.verify_costs`'s table."""
    for line in verify_table.splitlines():
        if line.startswith("| COSE_Sign1 signature only"):
            return float(line.split("|")[2]) / 1000.0
    return 0.0


async def main(args: argparse.Namespace) -> None:
    n = args.devices or (200 if args.quick else 10_000)
    info = machine_info()
    workers = args.workers if args.workers is not None else default_workers(n)
    shm = _flash_root()
    with (
        tempfile.TemporaryDirectory(prefix="iotdlm-bench-xfer-net-") as d,
        tempfile.TemporaryDirectory(prefix="iotdlm-bench-fleet-", dir=shm) as f,
    ):
        table, heads = await run(Path(d), Path(f), n, attest=not args.no_attest, profile=args.profile,
                                 workers=workers, spy_on=args.spy, quick=args.quick)  # fmt: skip
    machine = ", ".join(f"{k}: {v}" for k, v in info.items())
    section = "\n\n".join(
        [
            f"### Trust transfer of {n} devices over the network (HTTPS between cm's, NATS inside each)",
            f"Machine: {machine}.",
            table,
        ]
    )
    emit(section, args, heads)


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=int, default=None, help="fleet size (default 10000, 200 with --quick)")
    p.add_argument("--no-attest", action="store_true", help="no remote attestation (accept without --ra-uri)")
    p.add_argument("--profile", action="store_true", help="cProfile the device phase (slower)")
    p.add_argument("--spy", action="store_true", help="py-spy every process during the devices' pass")
    p.add_argument("--workers", type=int, default=None, help="device worker processes (default: fleet run's)")


if __name__ == "__main__":
    parsed = parse_args(__doc__.splitlines()[0], _extra)
    asyncio.run(main(parsed))
