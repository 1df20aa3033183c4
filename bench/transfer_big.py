"""Issue 13 gap (a): the providers' side of a trust transfer of 10,000 devices -- over the network
(the UpdateInfoList in byte ranges, the confirmation in parts: docs/adr/0019) and by file -- with
a raw certificate signature measured in the same run as the yardstick.

Two deployments on loopback, each with its own nats-server, km (with the transfer handlers, wired
as ``iotdlm km serve`` wires them) and cm on HTTPS: ``open_side`` of
tests/integration/test_transfer_peer.py, imported, not copied. The operators' steps are the CLI
of docs/operations.md section 10, each timed:

- network: SP1 ``export --serve``; SP2 ``accept --from --send`` (fetch in parts over HTTPS, verify
  the JWS, register the x5bag with CA2, post the TransferMessage); SP1 ``deliver --transfer``; SP2
  ``confirm --send`` (in parts) with CA1 revoking every old operational certificate in SP1's km;
- file: SP1 ``export --out``; SP2 ``accept --in --out``; SP1 ``deliver --in``; SP2 ``confirm --out``;
  SP1 ``revoke-old --in`` (its output says how: through a running km, or -- here, as the CLI does
  not know the loopback port of this bench's nats-server -- directly in the store with the CA keys).

Not timed (setup, reported apart): the fleet's factory and operational certificates, asked of SP1's
km by pm in batches over NATS (one key for every device: the key is not what this measures), twice
(one fleet per path: CA2 registers a factory certificate once). Between deliver and confirm the
devices' pass is not run (bench/transfer_network.py measures it): CA2's enrollment records are set
directly, as tests/integration/test_transfer_peer.py does.

Run: ``PYTHONPATH=src .venv/bin/python bench/transfer_big.py [--quick] [--devices N]`` (default
10,000; --quick 500). Nothing here asserts anything about time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from click.testing import CliRunner

from common import REPO, Headline, emit, log, machine_info, md_table, parse_args, raw_cert_rate

sys.path.insert(0, str(REPO))  # the two-deployment setup lives with the tests

from tests.integration.test_cm import ShiftClock
from tests.integration.test_transfer_big import mint
from tests.integration.test_transfer_peer import PW, SP1_ID, SP2_ID, Side, open_side

from iotdlm.cli.main import main as iotdlm_main
from iotdlm.deployment import PASSPHRASE_ENV
from iotdlm.km.registry import FactoryRegistry
from iotdlm.pki.chain import certs_to_pem
from iotdlm.transfer import status as st
from iotdlm.transfer.peer_parts import PeerLimits, megabytes
from iotdlm.transfer.shell import Sp2Service


async def cli(*args: str) -> str:
    """The command line in a thread of its own (cm and km answer on this event loop meanwhile)."""
    out = await asyncio.to_thread(CliRunner(env={PASSPHRASE_ENV: PW.decode()}).invoke, iotdlm_main, list(args))
    if out.exit_code != 0:
        raise RuntimeError(f"iotdlm {' '.join(args[:2])} failed ({out.exit_code}): {out.output}")
    return out.output


def enrolled_at_ca2(sp2: Side, tid: str, ids: list[str]) -> None:
    """What CA2 records when the devices re-enroll (not timed; bench/transfer_network.py runs it)."""
    svc = Sp2Service(
        store=sp2.store, identity=sp2.identity, clock=sp2.clock, registrar=FactoryRegistry(sp2.store, sp2.clock)
    )
    per = {d: {"certificate": os.urandom(32).hex()} for d in ids}
    svc.devices.set(tid, ids, st.ENROLLED, per_device=per)


class Phases:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float]] = []
        self.t = time.perf_counter()

    def mark(self, path: str, name: str) -> None:
        now = time.perf_counter()
        self.rows.append((path, name, now - self.t))
        log(f"{path}: {name}: {now - self.t:.2f}s")
        self.t = now

    def restart(self) -> None:
        self.t = time.perf_counter()


def _tid(said: str) -> str:
    return said.split("transfer ")[1].split(":")[0].strip()


async def network(sp1: Side, sp2: Side, files: dict[str, Path], ids: list[str], p: Phases) -> dict[str, str]:
    (files["tmp"] / "net.txt").write_text("\n".join(ids) + "\n")
    p.restart()
    said = await cli("transfer", "export", "--data", str(sp1.dep.root), "--peer-id", SP2_ID, "--peer-cert",
                     str(files["sp2_cert"]), "--devices-file", str(files["tmp"] / "net.txt"), "--serve")  # fmt: skip
    tid = _tid(said)
    p.mark("network", "SP1 `export --serve`: sign the UpdateInfoList, keep it for SP1's cm")
    await cli("transfer", "accept", "--data", str(sp2.dep.root), "--from", sp1.url, "--transfer", tid, "--cacert",
              str(files["root"]), "--peer-id", SP1_ID, "--peer-cert", str(files["sp1_cert"]), "--send")  # fmt: skip
    p.mark("network", "SP2 `accept --from --send`: fetch it in parts, verify, x5bag to CA2, TransferMessage to SP1")
    await cli("transfer", "deliver", "--data", str(sp1.dep.root), "--transfer", tid)
    p.mark("network", "SP1 `deliver --transfer`: one signed CWT per device, kept for SP1's cm")
    enrolled_at_ca2(sp2, tid, ids)
    p.restart()
    said = await cli("transfer", "confirm", "--data", str(sp2.dep.root), "--transfer", tid, "--send", sp1.url,
                     "--cacert", str(files["root"]))  # fmt: skip
    p.mark("network", "SP2 `confirm --send` (in parts); CA1 revokes the old operational certificates in SP1's km")
    size = (sp1.dep.root / "transfer" / "outbox" / f"{tid}.jws").stat().st_size
    revoked = sum(1 for r in sp1.store.get_transfer_devices("sp1", tid, ids).values() if r.status == st.REVOKED_AT_CA1)
    parts = -(-size // PeerLimits().part_bytes)
    return {"tid": tid, "uil": megabytes(size), "parts": str(parts), "confirm": " ".join(said.split("SP1:")[0].split()),
            "revoked": f"{revoked}/{len(ids)}"}  # fmt: skip


async def by_file(sp1: Side, sp2: Side, files: dict[str, Path], ids: list[str], p: Phases) -> dict[str, str]:
    tmp = files["tmp"]
    (tmp / "file.txt").write_text("\n".join(ids) + "\n")
    p.restart()
    said = await cli("transfer", "export", "--data", str(sp1.dep.root), "--peer-id", SP2_ID, "--peer-cert",
                     str(files["sp2_cert"]), "--devices-file", str(tmp / "file.txt"),
                     "--out", str(tmp / "uil.jws"))  # fmt: skip
    tid = _tid(said)
    p.mark("file", "SP1 `export --out`")
    await cli("transfer", "accept", "--data", str(sp2.dep.root), "--in", str(tmp / "uil.jws"), "--peer-id", SP1_ID,
              "--peer-cert", str(files["sp1_cert"]), "--out", str(tmp / "tm.cwt"))  # fmt: skip
    p.mark("file", "SP2 `accept --in --out`: verify, x5bag to CA2, TransferMessage")
    await cli("transfer", "deliver", "--data", str(sp1.dep.root), "--in", str(tmp / "tm.cwt"))
    p.mark("file", "SP1 `deliver --in`: verify the TransferMessage, one signed CWT per device")
    enrolled_at_ca2(sp2, tid, ids)
    p.restart()
    await cli("transfer", "confirm", "--data", str(sp2.dep.root), "--transfer", tid, "--out", str(tmp / "conf.cwt"))
    p.mark("file", "SP2 `confirm --out` (one confirmation)")
    said = await cli("transfer", "revoke-old", "--data", str(sp1.dep.root), "--in", str(tmp / "conf.cwt"))
    p.mark("file", "SP1 `revoke-old --in`: CA1 revokes the old operational certificates")
    return {"uil": megabytes((tmp / "uil.jws").stat().st_size), "confirm": megabytes((tmp / "conf.cwt").stat().st_size),
            "revoked": " ".join(said.split())}  # fmt: skip


async def run(tmp: Path, n: int) -> tuple[str, list[Headline]]:
    os.environ[PASSPHRASE_ENV] = PW.decode()
    clock = ShiftClock()
    async with open_side(tmp / "sp1", "SP1", SP1_ID, clock) as sp1, open_side(tmp / "sp2", "SP2", SP2_ID, clock) as sp2:
        FactoryRegistry(sp2.store, clock).register_cas(
            [sp1.dep.ca_certificate("root"), sp1.dep.ca_certificate("factory")], actor="bench"
        )
        files = {"tmp": tmp, "sp1_cert": tmp / "sp1.pem", "sp2_cert": tmp / "sp2.pem", "root": tmp / "root.pem"}
        files["sp1_cert"].write_bytes(certs_to_pem([sp1.identity.certificate]))
        files["sp2_cert"].write_bytes(certs_to_pem([sp2.identity.certificate]))
        files["root"].write_bytes(sp1.root_pem)
        t0 = time.perf_counter()
        net_ids, file_ids = [f"net-{i:05d}" for i in range(n)], [f"file-{i:05d}" for i in range(n)]
        for ids in (net_ids, file_ids):
            await mint(sp1, ids)
            await mint(sp1, ids, "operational")
        setup = time.perf_counter() - t0
        log(f"setup: {4 * n} certificates in {setup:.1f}s")
        p = Phases()
        net = await network(sp1, sp2, files, net_ids, p)
        fil = await by_file(sp1, sp2, files, file_ids, p)
    rates = sorted(raw_cert_rate(0.5) for _ in range(3))
    cert_ms = 1000.0 / rates[1]
    rows = []
    for path in ("network", "file"):
        total = sum(sec for q, _, sec in p.rows if q == path)
        for q, name, sec in p.rows:
            if q == path:
                rows.append([path, name, f"{sec:.2f}", f"{sec / n * 1000:.3f}", f"{sec / n * 1000 / cert_ms:.1f}x"])
        rows.append([path, f"**total, {n} devices**", f"**{total:.1f}**", f"{total / n * 1000:.3f}",
                     f"{total / n * 1000 / cert_ms:.1f}x"])  # fmt: skip
    table = md_table(["path", "phase (the CLI, as an operator runs it)", "seconds", "ms per device",
                      "per device / a raw cert sign (same run)"], rows)  # fmt: skip
    table += (
        f"\n\nYardstick, same run: `CertificateBuilder.sign` of a km-like certificate {cert_ms:.3f} ms "
        f"({rates[1]:,.0f}/s, median of 3). Network: the UpdateInfoList is {net['uil']}, fetched in {net['parts']} "
        f'part(s) of at most {megabytes(PeerLimits().part_bytes)}; SP2: "{net["confirm"]}"; revoked-at-CA1 at SP1: '
        f'{net["revoked"]}. File: UpdateInfoList {fil["uil"]}, confirmation {fil["confirm"]}; SP1: "{fil["revoked"]}". '
        f"Setup (not timed): {4 * n:,} certificates from SP1's km in {setup:.1f} s. "
        f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}."
    )
    net_total = sum(sec for q, _, sec in p.rows if q == "network")
    head = [
        Headline(
            what=f"trust transfer of {n} devices, providers' side over the network (export, accept, deliver, confirm)",
            paper="(not measured in the paper)",
            target="goes through at 10,000 (was refused above ~1,090)",
            measured=f"{net_total:.1f} s",
            verdict="met" if n >= 10_000 and net["revoked"] == f"{n}/{n}" else "n/a (fewer devices)",
        )
    ]
    return table, head


async def main(args: argparse.Namespace) -> None:
    n = args.devices or (500 if args.quick else 10_000)
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="iotdlm-bench-xfer-big-") as d:
        table, heads = await run(Path(d), n)
    machine = ", ".join(f"{k}: {v}" for k, v in info.items())
    section = "\n\n".join(
        [
            f"### A transfer of {n} devices at the providers' level (network in parts, and by file)",
            f"Machine: {machine}.",
            table,
        ]
    )
    emit(section, args, heads)


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=int, default=None, help="fleet size (default 10000, 500 with --quick)")


if __name__ == "__main__":
    asyncio.run(main(parse_args(__doc__.splitlines()[0], _extra)))
