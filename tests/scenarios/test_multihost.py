"""Issue 16, part 3: one deployment on three hosts, failures under load (ADR 0027, ADR 0025).

Three "hosts" on distinct loopback addresses (127.0.0.2-4), a 3-node NATS cluster with JetStream
(one node per host, TLS routes between them verified both ways, each its own store folder), a
PostgreSQL the test starts itself, km on two hosts and cm on the third, each host ``iotdlm up
--services ...`` as its own process. The CA keys are in one SoftHSM2 token that both km hosts
open themselves (one token folder through ``SOFTHSM2_CONF``, as two hosts share a network HSM;
host 0 reads the PIN from its file, host 1 from ``$IOTDLM_HSM_PIN``): no host folder holds a CA
key, and every certificate, CRL and OCSP response the clients received verifies with the CA
certificates. The mode bucket and the audit heads stream are made with 3 replicas (automatic: the
cluster has 3 nodes).

Under sustained issuance (admin's signed requests over NATS, spread over the two km workers by
their queue group), revocation, and OCSP and CRL load through cm, the test kills -9 one NATS node,
then one km host (its supervisor and km at once), then restarts PostgreSQL. Afterwards: every
certificate a client received is in the store, no serial is duplicated, delta CRL numbers rise
strictly across the workers (one number never names two different CRLs), the audit log verifies
(`iotdlm audit verify`, against the heads in the replicated stream), and service resumed after
each fault within a generous bound; the time it took is printed, never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from iotdlm import errors
from iotdlm.bus import subjects
from iotdlm.client.connect import connect_identity, km_trust, sealer_for
from iotdlm.client.km import KmClient
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment
from iotdlm.runtime import open_store
from tests.fixtures_hsm import SoftHsm, needs_softhsm
from tests.scenarios import multihost_parts as mh

pytestmark = [pytest.mark.nats, pytest.mark.real_clock]

ISSUERS = 3  # concurrent issuance clients
OCSP_CLIENTS = 2
#: a fault's effect must be over within this long (generous: a slow, loaded CI machine)
RESUME_BOUND = 60.0
STEADY = 3.0  # seconds of load before each fault and at the end


@dataclass
class Load:
    """What the clients saw."""

    issued: list[tuple[str, str, bytes]] = field(default_factory=list)  # issuer, serial, DER
    issued_at: list[float] = field(default_factory=list)  # monotonic time of each issuance
    failures: int = 0
    ocsp_good: int = 0
    revoked: list[str] = field(default_factory=list)
    crls: dict[tuple[str, int], bytes] = field(default_factory=dict)  # (partition URL, number) -> DER
    crl_order: dict[str, list[int]] = field(default_factory=dict)  # partition URL -> numbers as fetched
    duplicate_numbers: list[tuple[str, int]] = field(default_factory=list)
    ocsp_samples: list[bytes] = field(default_factory=list)  # a few successful OCSP responses
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def resumed_after(self, fault: float) -> float | None:
        """How long issuance stalled after ``fault``: the longest pause between two certificates
        received from just before the fault on (``None`` while none arrived after it)."""
        times = [t for t in self.issued_at if t > fault - 1.0]
        if not times or times[-1] <= fault:
            return None
        return max(b - a for a, b in zip([fault - 1.0, *times], times, strict=False))


def _csr(device_id: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, device_id)])
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


async def issuer(client: KmClient, n: int, load: Load) -> None:
    i = 0
    while not load.stop.is_set():
        i += 1
        try:
            got = await client.issue(f"mh-{n}-{i}", "operational", csr=_csr(f"mh-{n}-{i}"))
        except errors.IotdlmError:
            load.failures += 1
            await asyncio.sleep(0.2)
            continue
        load.issued.append((got.issuer, got.serial, got.certificate))
        load.issued_at.append(time.monotonic())
        if i % 7 == 0:  # every 7th is revoked: each revocation makes the workers refresh delta CRLs
            with contextlib.suppress(errors.IotdlmError):
                await client.revoke(serial=got.serial, issuer=got.issuer, reason="keyCompromise")
                load.revoked.append(got.serial)


async def ocsp_client(http: aiohttp.ClientSession, url: str, ca: x509.Certificate, load: Load) -> None:
    k = 0
    while not load.stop.is_set():
        if not load.issued:
            await asyncio.sleep(0.1)
            continue
        k += 1
        cert = x509.load_der_x509_certificate(load.issued[-(k % len(load.issued)) - 1][2])
        der = ocsp.OCSPRequestBuilder().add_certificate(cert, ca, hashes.SHA256()).build()
        try:
            async with http.post(
                f"{url}/ocsp", data=der.public_bytes(serialization.Encoding.DER),
                headers={"Content-Type": "application/ocsp-request"},
            ) as r:  # fmt: skip
                body = await r.read()
            answer = ocsp.load_der_ocsp_response(body)
            if answer.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL:
                load.ocsp_good += 1
                if k % 25 == 1:
                    load.ocsp_samples.append(body)
            else:
                load.failures += 1
        except (aiohttp.ClientError, ValueError, TimeoutError):
            load.failures += 1
        if k % 10 == 0:
            await fetch_delta_crl(http, cert, load)
        await asyncio.sleep(0.02)


async def fetch_delta_crl(http: aiohttp.ClientSession, cert: x509.Certificate, load: Load) -> None:
    """The delta CRL of the certificate's partition (its FreshestCRL), as cm hands it out."""
    freshest = cert.extensions.get_extension_for_class(x509.FreshestCRL).value
    url = freshest[0].full_name[0].value  # type: ignore[index]
    try:
        async with http.get(url) as r:
            if r.status != 200:
                return
            der = await r.read()
    except (aiohttp.ClientError, TimeoutError):
        return
    crl = x509.load_der_x509_crl(der)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    seen = load.crls.setdefault((url, number), der)
    if seen != der:
        load.duplicate_numbers.append((url, number))
    load.crl_order.setdefault(url, []).append(number)


def check_crl_numbers(load: Load) -> None:
    """Per partition, a CRL made later (thisUpdate) by whichever worker carries a higher number.
    (The order the clients fetched them in proves nothing: a worker may still serve the CRL it
    made before another worker's newer one, until the revocation event reaches it.)"""
    by_url: dict[str, list[tuple[dt.datetime, int]]] = {}
    for (url, number), der in load.crls.items():
        by_url.setdefault(url, []).append((x509.load_der_x509_crl(der).last_update_utc, number))
    for url, made in by_url.items():
        made.sort()
        for (t1, n1), (t2, n2) in itertools.pairwise(made):
            assert t1 == t2 or n1 < n2, f"{url}: CRL {n2} made at {t2} after CRL {n1} made at {t1}"


def check_signatures(dep: Deployment, load: Load) -> None:
    """Every certificate and delta CRL received, and the sampled OCSP responses, verify with the CA
    certificates (signed in the token by whichever km host answered)."""
    cas = {c.subject: c for c in (dep.ca_certificate(g.name) for g in dep.ca_generations())}
    for issuer_name, _, der in load.issued:
        x509.load_der_x509_certificate(der).verify_directly_issued_by(dep.ca_certificate(issuer_name))
    for der in load.crls.values():
        crl = x509.load_der_x509_crl(der)
        ca_key = cas[crl.issuer].public_key()
        assert isinstance(ca_key, ec.EllipticCurvePublicKey)
        assert crl.is_signature_valid(ca_key), f"a delta CRL of {crl.issuer.rfc4514_string()} does not verify"
    assert load.ocsp_samples, "no OCSP response sampled"
    for body in load.ocsp_samples:
        answer = ocsp.load_der_ocsp_response(body)
        responder = answer.certificates[0] if answer.certificates else dep.ca_certificate("operational")
        if answer.certificates:
            responder.verify_directly_issued_by(cas[responder.issuer])
        pub = responder.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        assert answer.signature_hash_algorithm is not None
        pub.verify(answer.signature, answer.tbs_response_bytes, ec.ECDSA(answer.signature_hash_algorithm))


def check_store(dep: Deployment, load: Load) -> None:
    store = open_store(dep, migrate=False)
    try:
        serials = [int(serial, 16) for _, serial, _ in load.issued]
        assert len(serials) == len(set(serials)), "a serial was handed out twice"
        for issuer_name, serial, der in load.issued:
            rec = store.get_certificate(issuer_name, int(serial, 16))
            assert rec is not None, f"certificate {serial} a client received is not in the store"
            assert store.find_by_serial(int(serial, 16)) == [rec]
            assert x509.load_der_x509_certificate(der).serial_number == int(serial, 16)
    finally:
        store.close()


@needs_softhsm
async def test_three_hosts_survive_a_nats_node_a_km_host_and_a_database_restart(
    tmp_path: Path, softhsm: SoftHsm
) -> None:
    pg = mh.Postgres()
    began = time.monotonic()
    pg.start()
    cluster: mh.Cluster | None = None
    try:
        site = await asyncio.to_thread(mh.make_site, tmp_path, pg, softhsm)
        cluster = mh.Cluster(tmp_path / "nats", site)
        await asyncio.to_thread(cluster.start)
        await asyncio.to_thread(mh.place_hosts, site, cluster.url)
        cas = [site.dep.ca_certificate(name) for name in ("root", *(g.name for g in site.dep.ca_generations()))]
        assert not mh.ca_key_files([site.dep.root, *site.hosts], cas), "a CA key is in a data folder"
        hosts = [mh.up(site, 0, "km"), mh.up(site, 1, "km"), mh.up(site, 2, "cm")]
        with mh.running(hosts):
            await run_scenario(site, cluster, pg, hosts, began)
        assert not mh.ca_key_files([site.dep.root, *site.hosts], cas), "a host wrote a CA key into its folder"
    finally:
        if cluster is not None:
            cluster.stop()
        pg.stop()


async def run_scenario(
    site: mh.Site, cluster: mh.Cluster, pg: mh.Postgres, hosts: list[subprocess.Popen[bytes]], began: float
) -> None:
    dep = Deployment.load(site.hosts[0])
    bus, ident = await connect_identity(dep, "admin")
    client = KmClient(bus, sealer_for(ident), SystemClock(), timeout=8.0, trust=km_trust(dep))
    load = Load()
    try:
        await mh.until(lambda: ready(client), 90, "km on the two hosts to answer")
        mode_kv = await bus.key_value(subjects.MODE_BUCKET)  # made by the hosts' supervisors
        js = bus._js_context()  # type: ignore[attr-defined]
        for stream in (subjects.kv_stream(subjects.MODE_BUCKET), subjects.AUDIT_HEADS_STREAM):
            info = await js.stream_info(stream)
            print(f"{stream}: {info.config.num_replicas} replicas")
            assert info.config.num_replicas == 3, f"{stream} has {info.config.num_replicas} replica(s), not 3"
        for i in range(len(mh.HOSTS)):
            tls, routes = cluster.route_tls(i)
            assert tls, f"NATS node {i}'s routes do not require and verify TLS"
            assert routes >= 2, f"NATS node {i} holds {routes} route(s), not one to each other node"
        print(f"set-up: {time.monotonic() - began:.1f} s")
        ca = dep.ca_certificate("operational")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            tasks = [asyncio.ensure_future(issuer(client, n, load)) for n in range(ISSUERS)]
            tasks += [asyncio.ensure_future(ocsp_client(http, site.cm_http, ca, load)) for _ in range(OCSP_CLIENTS)]
            try:
                await faults(cluster, pg, site, hosts, load)
                entry = await mode_kv.get(subjects.MODE_KEY)
                assert entry is not None, "a --services host that stopped took the mode away from the others"
            finally:
                load.stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await bus.close()
    print(
        f"issued {len(load.issued)}, revoked {len(load.revoked)}, OCSP good {load.ocsp_good}, "
        f"failed calls {load.failures}, delta CRLs seen {len(load.crls)}; whole test {time.monotonic() - began:.1f} s"
    )
    check_store(dep, load)
    check_signatures(dep, load)
    assert not load.duplicate_numbers, f"one CRL number named two different CRLs: {load.duplicate_numbers}"
    check_crl_numbers(load)
    changed = max(len(set(n)) for n in load.crl_order.values())
    assert changed >= 2, "no partition's delta CRL changed: nothing to compare"
    argv = [sys.executable, "-m", "iotdlm.cli.main", "audit", "verify", "--data", str(site.hosts[1])]
    verify = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=120, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr


async def ready(client: KmClient) -> bool:
    try:
        await client.chain()
    except errors.IotdlmError:
        return False
    return True


def bounce(hosts: list[subprocess.Popen[bytes]], i: int, site: mh.Site) -> None:
    """Start host ``i``'s ``up --services km`` again (it opens the token again), let its km join,
    then stop it with SIGTERM (exit 0 expected)."""
    hosts[i] = mh.up(site, i, "km")
    time.sleep(STEADY * 2)
    mh.stop_host(hosts[i])
    assert hosts[i].returncode == 0, (site.hosts[i] / "up.out").read_text()[-2000:]


async def faults(
    cluster: mh.Cluster, pg: mh.Postgres, site: mh.Site, hosts: list[subprocess.Popen[bytes]], load: Load
) -> None:
    """kill -9 a NATS node, then a km host, then restart PostgreSQL, then bring the km host back
    and stop it with SIGTERM; each time, wait until service is back (certificates issued after
    the fault) and print how long issuance stalled."""
    await mh.until(lambda: len(load.issued) >= 5, 60, "the first issued certificates")
    await asyncio.sleep(STEADY)
    steps = [
        ("kill -9 NATS node 1", lambda: cluster.nodes[1].kill()),
        ("kill -9 km host 0 (supervisor and km)", lambda: mh.kill_host(hosts[0])),
        ("restart PostgreSQL", pg.restart),
        # a km host back, then stopped as an operator stops it: the mode stays for the others
        ("km host 0 up again, then SIGTERM", lambda: bounce(hosts, 0, site)),
    ]
    for what, act in steps:
        at = time.monotonic()
        before = len(load.issued)
        await asyncio.to_thread(act)
        await mh.until(
            lambda at=at, before=before: len(load.issued) > before + 3 and load.resumed_after(at) is not None,
            RESUME_BOUND,
            f"service after: {what}",
        )
        await asyncio.sleep(STEADY)
        stall = load.resumed_after(at)
        print(f"{what}: issuance stalled at most {stall:.2f} s (issued {len(load.issued)} so far)")
