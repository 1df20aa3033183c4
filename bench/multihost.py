"""Issuance through km workers on 2 hosts beside 1 host, CA keys in files and in an HSM token
(issue 16, ADR 0027, ADR 0025).

The set-up of tests/scenarios/test_multihost.py: a 3-node NATS cluster with JetStream on
127.0.0.2-4 (TLS on the client port and on the routes), a PostgreSQL of the bench's own, one
deployment copied to each host folder -- once with the CA keys in encrypted files, once with them
in one SoftHSM2 token that both km hosts open (``--keys``; a fresh cluster and PostgreSQL each). First one
host runs ``iotdlm up --services km``, then a second one joins; each time admin's signed requests
(``KmClient.issue``, single certificates, CSRs made before the clock starts) run from
``--clients`` loops for ``--duration`` seconds, spread over the workers by their queue group. The
figure is the 2-host rate as a ratio to the 1-host rate measured in the same run. Both hosts share
this machine's cores: on 2 cores the ratio says what the second worker adds beside the database and
NATS, not what a second machine would.

Run: ``.venv/bin/python bench/multihost.py [--duration S] [--clients N] [--keys file|hsm|both]
[--quick] [--md F --json F]`` (as root: PostgreSQL runs as the postgres user). Prints Markdown on
stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psycopg
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fixtures_hsm import SOFTHSM_MODULE, make_token
from tests.scenarios import multihost_parts as mh

from common import Headline, emit, log, md_table
from iotdlm.client.connect import connect_identity, km_trust, sealer_for
from iotdlm.client.km import KmClient
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment
from iotdlm.errors import IotdlmError

#: CSRs made per second of a measurement (more than km issues here)
POOL_PER_SECOND = 600


def csrs(tag: str, n: int) -> list[tuple[str, bytes]]:
    """``n`` device ids and their CSRs (the subject CN is the device id), made before the clock starts."""
    out = []
    for i in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, f"{tag}-{i}")])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        out.append((f"{tag}-{i}", csr.public_bytes(serialization.Encoding.DER)))
    return out


async def measure(client: KmClient, tag: str, clients: int, duration: float) -> float:
    done = 0
    errors: list[str] = []
    pool = iter(csrs(tag, int(POOL_PER_SECOND * duration)))
    stop = time.monotonic() + duration

    async def loop() -> None:
        nonlocal done
        for device_id, csr in pool:
            if time.monotonic() >= stop:
                return
            try:
                await client.issue(device_id, "operational", csr=csr)
            except IotdlmError as exc:
                errors.append(exc.message)
                continue
            done += 1

    began = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(clients)))
    if errors:
        print(f"{tag}: {len(errors)} refused or failed, e.g. {errors[0]}", file=sys.stderr)
    return done / (time.monotonic() - began)


async def until_workers(client: KmClient) -> None:
    for _ in range(400):
        try:
            await client.chain()
            return
        except IotdlmError:
            await asyncio.sleep(0.25)
    raise SystemExit("km did not answer")


def nats_bytes(cluster: mh.Cluster) -> int:
    """Bytes in and out of every node of the cluster so far (nats-server's /varz)."""
    total = 0
    for host, port in zip(mh.HOSTS, cluster.http, strict=True):
        with urllib.request.urlopen(f"http://{host}:{port}/varz", timeout=5) as r:
            varz = json.loads(r.read())
        total += int(varz["in_bytes"]) + int(varz["out_bytes"])
    return total


def database_figures(pg: mh.Postgres) -> tuple[int, int, int]:
    """(database bytes, certificates, audit records) of the bench's PostgreSQL."""
    with psycopg.connect(f"host=127.0.0.1 port={pg.port} user=postgres dbname=postgres") as conn:
        rows = [
            conn.execute(sql).fetchone()
            for sql in (
                "SELECT pg_database_size('postgres')",
                "SELECT count(*) FROM certificates",
                "SELECT count(*) FROM audit_log",
            )
        ]
    size, certs, audit = (int(row[0]) if row else 0 for row in rows)
    return size, certs, audit


@dataclass
class Figures:
    one: float = 0.0
    two: float = 0.0
    nats_per_cert: float = 0.0
    db_per_cert: float = 0.0
    audit_per_cert: float = 0.0


async def run(args: argparse.Namespace, site: mh.Site, cluster: mh.Cluster, pg: mh.Postgres) -> Figures:
    dep = Deployment.load(site.hosts[0])
    bus, ident = await connect_identity(dep, "admin")
    client = KmClient(bus, sealer_for(ident), SystemClock(), timeout=10.0, trust=km_trust(dep))
    hosts = [mh.up(site, 0, "km")]
    try:
        await until_workers(client)
        await measure(client, "warm", args.clients, 2.0)
        size0, certs0, audit0 = database_figures(pg)
        bytes0 = nats_bytes(cluster)
        out = Figures(one=await measure(client, "one", args.clients, args.duration))
        size1, certs1, audit1 = database_figures(pg)
        issued = max(1, certs1 - certs0)
        out.nats_per_cert = (nats_bytes(cluster) - bytes0) / issued
        out.db_per_cert = (size1 - size0) / issued
        out.audit_per_cert = (audit1 - audit0) / issued
        hosts.append(mh.up(site, 1, "km"))
        await asyncio.sleep(4.0 if args.quick else 8.0)  # the second host's km joins the queue group
        out.two = await measure(client, "two", args.clients, args.duration)
    finally:
        await bus.close()
        for proc in reversed(hosts):
            mh.stop_host(proc)
    return out


def one_site(args: argparse.Namespace, tmp: Path, hsm: bool) -> Figures:
    """A fresh PostgreSQL, deployment (CA keys in files, or in the token) and cluster; the figures."""
    pg = mh.Postgres()
    pg.start()
    cluster = None
    try:
        token = make_token(tmp / "softhsm") if hsm else None
        site = mh.make_site(tmp, pg, token)
        cluster = mh.Cluster(tmp / "nats", site)
        cluster.start()
        mh.place_hosts(site, cluster.url, console=False)  # the operator console is not what is measured
        return asyncio.run(run(args, site, cluster, pg))
    finally:
        if cluster is not None:
            cluster.stop()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def rows(kind: str, got: Figures, args: argparse.Namespace, loads: str) -> tuple[list[list[str]], Headline]:
    keys = "CA keys in a SoftHSM2 token both hosts share" if kind == "hsm" else "CA keys in files"
    what = f"issuance, km on 2 hosts / 1 host ({keys}; 3-node NATS cluster, TLS routes, PostgreSQL)"
    ratio = got.two / got.one if got.one else 0.0
    per_cert = f"{got.nats_per_cert:,.0f} B"
    table = [
        [what, f"{got.two:,.0f} certificates/s", f"km on 1 host: {got.one:,.0f}/s", f"{ratio:.2f}x", loads],
        [f"NATS bytes in + out of all 3 nodes per certificate (1 host, {kind})", per_cert, "-", "-", loads],
        [
            f"PostgreSQL growth per certificate issued (1 host, {kind}; {got.audit_per_cert:.2f} audit records each)",
            f"{got.db_per_cert:,.0f} B", "-", "-", loads,
        ],
    ]  # fmt: skip
    head = Headline(
        what=what, paper="-", target="-", measured=f"{got.two:,.0f} certificates/s (km on 1 host: {got.one:,.0f}/s)",
        verdict="measured", yardstick="km on 1 host", ratio=round(ratio, 3), load=loads,
    )  # fmt: skip
    return table, head


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=15.0, help="seconds of each measurement (default 15)")
    p.add_argument("--clients", type=int, default=8, help="concurrent issuance loops (default 8)")
    p.add_argument("--keys", choices=("file", "hsm", "both"), default="both", help="where the CA keys are")
    p.add_argument("--quick", action="store_true", help="a smoke run (1 s measurements), not for figures")
    p.add_argument("--md", type=Path, help="also write the Markdown section to this file")
    p.add_argument("--json", type=Path, help="also write the headline figures (for run_all.py) to this file")
    args = p.parse_args()
    if args.quick:
        args.duration, args.clients = 1.0, 4
    kinds = ["file", "hsm"] if args.keys == "both" else [args.keys]
    if "hsm" in kinds and not (Path(SOFTHSM_MODULE).is_file() and shutil.which("softhsm2-util")):
        log("multihost: SoftHSM2 is not installed (Debian softhsm2): the token rows are not measured")
        kinds.remove("hsm")
    table: list[list[str]] = []
    heads: list[Headline] = []
    for kind in kinds:
        load = os.getloadavg()
        log(f"multihost: CA keys in {kind}")
        got = one_site(args, Path(tempfile.mkdtemp(prefix=f"iotdlm-bench-mh-{kind}-")), kind == "hsm")
        more, head = rows(kind, got, args, f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        table += more
        heads.append(head)
    header = ["figure", "measured", "yardstick", "ratio", "load"]
    title = (
        f"### Several hosts: km on 2 hosts beside 1 ({args.clients} clients, single requests, {args.duration:g} s each)"
    )
    emit(title + "\n\n" + md_table(header, table), args, heads)


if __name__ == "__main__":
    main()
