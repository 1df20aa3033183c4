"""Issue 17: bytes on the wire per enrollment and re-enrollment, CoAP/EDHOC/OSCORE against EST over
HTTPS (TLS 1.3, DER), measured in the same run; every CoAP datagram listed beside seed 003's
Table I (EDHOC/C509 column).

Setup (real parts): a deployment (P-256), the embedded nats-server, one km worker process, cm in
this process (``CmService.from_deployment``: the HTTPS door and the CoAP door, each on loopback).
Two counting proxies sit in front of cm: a UDP one in front of the CoAP door (it counts every
datagram's payload, i.e. the whole CoAP message: header, options, OSCORE and EDHOC bytes) and a
TCP one in front of the HTTPS door (it counts every byte of the TLS stream: handshake, records,
HTTP inside). IP and UDP/TCP headers are not counted on either side.

Per device, each way: a fresh session (EST: a new TLS connection with the client certificate, the
nonce GET, the simpleenroll POST; CoAP: EDHOC message 1/2, the nonce request carrying message 3,
the sen request), then the same for re-enrollment with the operational credential. CoAP runs twice:
with DER certificates (the certificate in pn and again in sen), and as a constrained C509 device
(the certificate as C509 in pn only, the compact sen, the issued certificate and crts asked in
C509; ADR 0029). EST is DER (TLS 1.3 has RFC 8879 compression, not C509; neither side uses it).

Run: ``PYTHONPATH=src .venv/bin/python bench/coap_bytes.py [--quick] [--devices N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import re
import socket
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import transfer as tr
from cm_est import set_mode, until_mode_seen
from common import DTYPE, Headline, bench_deployment, csr_der, emit, log, machine_info, md_table, parse_args
from iotdlm.c509 import encode_c509
from iotdlm.client.transfer_device import TransferDeviceClient
from iotdlm.clock import SystemClock
from iotdlm.cm.cacerts import CaCerts
from iotdlm.cm.coap import CoapDoor
from iotdlm.cm.config import CmConfig, CoapConfig
from iotdlm.cm.service import CmService
from iotdlm.device.coap_client import CoapEnroller, CoapEstClient
from iotdlm.device.est_client import EstClient
from iotdlm.km.registry import FactoryRegistry
from iotdlm.km.transfer_device_handlers import keep_messages
from iotdlm.pki.chain import certs_to_pem
from iotdlm.pki.keys import private_key_to_pem
from iotdlm.transfer.agent import DeviceAgent, LocalFallback
from iotdlm.transfer.shell import Sp1Service, Sp2Service

#: seed 003 Table I, EDHOC/C509 column (bytes; the paper gives lower bounds)
TABLE_I = {"factory certificate": "> 150 (C509)", "DeviceUpdateInfo": "> 230"}


# ------------------------------------------------------------------------------------ counting proxies
@dataclass
class Tally:
    """What crossed a proxy: (direction, bytes) per datagram or per read."""

    items: list[tuple[str, int]] = field(default_factory=list)

    def total(self) -> int:
        return sum(n for _, n in self.items)

    def take(self) -> list[tuple[str, int]]:
        out, self.items = self.items, []
        return out


def describe(direction: str, datagram: bytes) -> str:
    """What an observer on the path sees of a CoAP message: its outer code, the Uri-Path if not
    protected, and whether it is OSCORE-protected or carries EDHOC message 3."""
    try:
        m = aiocoap.Message.decode(datagram)
    except Exception:  # the bench only labels; an odd datagram is still counted
        return f"{direction}: not CoAP"
    parts = [f"{direction}: {m.code}"]
    if m.opt.uri_path:
        parts.append("/" + "/".join(m.opt.uri_path))
    if m.opt.oscore is not None:
        parts.append("OSCORE")
    if m.opt.edhoc:
        stream = io.BytesIO(m.payload)
        cbor2.load(stream)  # message_3 is one CBOR byte string in front of the OSCORE ciphertext
        parts.append(f"+ EDHOC message_3 ({stream.tell()} B of it)")
    if m.opt.uri_path == (".well-known", "edhoc"):
        parts.append("(message_1)" if m.payload[:1] == b"\xf5" else "(message_3)")
    return " ".join(parts)


class _UdpFront(asyncio.DatagramProtocol):
    """Forwards each client's datagrams to ``target`` from a socket of its own (made at once, so
    the datagrams of a blockwise transfer leave in order from one source port), and back."""

    def __init__(self, target: tuple[str, int], tally: Tally) -> None:
        self.target, self.tally = target, tally
        self.transport: asyncio.DatagramTransport | None = None
        self.upstreams: dict[tuple[str, int], socket.socket] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport here

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.tally.items.append((describe("device -> cm", data), len(data)))
        up = self.upstreams.get(addr)
        if up is None:
            up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            up.setblocking(False)
            up.connect(self.target)
            asyncio.get_running_loop().add_reader(up.fileno(), self._back, up, addr)
            self.upstreams[addr] = up
        up.send(data)

    def _back(self, up: socket.socket, addr: tuple[str, int]) -> None:
        with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
            data = up.recv(65536)
            self.tally.items.append((describe("cm -> device", data), len(data)))
            assert self.transport is not None
            self.transport.sendto(data, addr)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for up in self.upstreams.values():
            loop.remove_reader(up.fileno())
            up.close()


@contextlib.asynccontextmanager
async def udp_proxy(port: int, tally: Tally) -> AsyncIterator[int]:
    front = _UdpFront(("127.0.0.1", port), tally)
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: front, local_addr=("127.0.0.1", 0))
    try:
        yield transport.get_extra_info("sockname")[1]
    finally:
        transport.close()
        front.close()


@contextlib.asynccontextmanager
async def tcp_proxy(port: int, tally: Tally) -> AsyncIterator[int]:
    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                tally.items.append((direction, len(data)))
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(Exception):
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pump(reader, up_writer, "device -> cm"), pump(up_reader, writer, "cm -> device"))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


# ------------------------------------------------------------------------------------ one device each way
@dataclass(frozen=True)
class Device:
    device_id: str
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate


async def est_round(url: str, anchor: bytes, dev: Device, tally: Tally) -> tuple[int, int, Device]:
    """(enroll bytes, re-enroll bytes, the device after) over EST/HTTPS, each on a new TLS session."""
    sizes: list[int] = []
    for op in ("simpleenroll", "simplereenroll"):
        new_key = ec.generate_private_key(ec.SECP256R1())
        client = EstClient(
            url,
            trust_anchor_pem=anchor,
            client_cert_pem=certs_to_pem([dev.certificate]),
            client_key_pem=private_key_to_pem(dev.key, None),
            connections=1,
        )
        async with client as c:
            csr = csr_der(new_key, dev.device_id)
            cert = await (c.simpleenroll(csr) if op == "simpleenroll" else c.simplereenroll(csr))
        await asyncio.sleep(0.05)  # the close_notify alerts
        sizes.append(tally.total())
        tally.take()
        dev = Device(dev.device_id, new_key, cert)
    return sizes[0], sizes[1], dev


async def coap_round(
    uri: str, cred_r: bytes, dev: Device, tally: Tally, *, c509: bool = False
) -> tuple[list[tuple[str, int]], list[tuple[str, int]], Device]:
    """(enroll datagrams, re-enroll datagrams, the device after) over CoAP/EDHOC/OSCORE (``c509``:
    as a constrained C509 device)."""
    out: list[list[tuple[str, int]]] = []
    for op in ("sen", "sren"):
        new_key = ec.generate_private_key(ec.SECP256R1())
        client = CoapEstClient(uri, responder_credential=cred_r, key=dev.key, certificate=dev.certificate, c509=c509)
        async with client as c:
            csr = csr_der(new_key, dev.device_id)
            cert = await (c.simpleenroll(csr) if op == "sen" else c.simplereenroll(csr))
        await asyncio.sleep(0.02)
        out.append(tally.take())
        dev = Device(dev.device_id, new_key, cert)
    return out[0], out[1], dev


# ------------------------------------------------------------------------------------ main
async def factory_devices(bd: object, n: int) -> list[Device]:
    from iotdlm.wire import km as msg

    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(n)]
    ids = [f"{DTYPE}-coap-{i:04d}" for i in range(n)]
    await set_mode(bd, "provisioning-certificate")  # type: ignore[arg-type]
    pm = await bd.pm_client()  # type: ignore[attr-defined]
    items = [msg.IssueItem(device_id=ids[i], profile="factory", csr=csr_der(keys[i], ids[i])) for i in range(n)]
    results = await until_mode_seen(lambda: pm.issue_batch(items))
    await set_mode(bd, "certificate-management")  # type: ignore[arg-type]
    out = []
    for i, r in enumerate(results):
        assert r.certificate is not None, r.error
        out.append(Device(ids[i], keys[i], x509.load_der_x509_certificate(r.certificate.certificate)))
    return out


async def measure(n: int) -> dict[str, object]:
    async with bench_deployment(1) as bd:
        devices = await factory_devices(bd, n)
        config = CmConfig(https_port=0, http_port=None, coap=CoapConfig(port=0))
        cm = await CmService.from_deployment(bd.dep, config)
        await cm.start()
        assert cm.coap is not None
        anchor = (bd.dep.root / "ca" / "root.pem").read_bytes()
        udp, tcp = Tally(), Tally()
        est_sizes: list[tuple[int, int]] = []
        coap_runs: list[tuple[list[tuple[str, int]], list[tuple[str, int]]]] = []
        c509_runs: list[tuple[list[tuple[str, int]], list[tuple[str, int]]]] = []
        try:
            async with udp_proxy(cm.coap.port, udp) as uport, tcp_proxy(cm.https_port, tcp) as tport:
                for i, dev in enumerate(devices):
                    log(f"device {i + 1}/{n}: EST over HTTPS, then CoAP/EDHOC/OSCORE")
                    e1, e2, _ = await until_mode_seen(
                        lambda dev=dev: est_round(f"https://127.0.0.1:{tport}", anchor, dev, tcp)  # type: ignore[misc]
                    )
                    est_sizes.append((e1, e2))
                    c1, c2, _ = await coap_round(f"coap://127.0.0.1:{uport}", cm.coap.credential_bytes, dev, udp)
                    coap_runs.append((c1, c2))
                    k1, k2, _ = await coap_round(
                        f"coap://127.0.0.1:{uport}", cm.coap.credential_bytes, dev, udp, c509=True
                    )
                    c509_runs.append((k1, k2))
        finally:
            await cm.stop()
        factory = devices[0].certificate.public_bytes(serialization.Encoding.DER)
    return {
        "est": est_sizes, "coap": coap_runs, "c509": c509_runs,
        "factory_der": len(factory), "factory_c509": len(encode_c509(factory)),
    }  # fmt: skip


def handshake_bytes(datagrams: list[tuple[str, int]]) -> int:
    """EDHOC's share of a session: message_1's datagram, the answer after it (message_2), and
    message_3 (inside the first OSCORE request)."""
    first = next(i for i, (d, _) in enumerate(datagrams) if "(message_1)" in d)
    m3 = sum(int(x) for d, _ in datagrams for x in re.findall(r"message_3 \((\d+) B", d))
    return datagrams[first][1] + datagrams[first + 1][1] + m3


async def _door(p: Any, clock: SystemClock, *, transfer: bool) -> CoapDoor:
    """A provider's CoAP door, relaying to its in-process km as cm (``transfer``: with /transfer/tm)."""
    cm = p.client("cm")
    cas = CaCerts([p.ca("operational"), p.ca("root")], fetch=None, clock=clock)
    tdc = TransferDeviceClient.like(cm) if transfer else None
    door = CoapDoor(CoapConfig(port=0), km=cm, cacerts=cas, key=ec.generate_private_key(ec.SECP256R1()), transfer=tdc)
    await door.start()
    return door


def _messages(
    sp1: Any, sp2: Any, sp1svc: Sp1Service, sp2svc: Sp2Service, ids: list[str]
) -> tuple[dict[str, bytes], bytes]:
    """SP1 exports, SP2 accepts (no attestation, no update), SP1 signs the per-device messages and
    keeps them for the devices to fetch (``transfer deliver``)."""
    now = SystemClock().now()
    _tid, uil = sp1svc.export(
        ids, peer_id=tr.SP2_ID, peer_certificate=sp2.identity.certificate,
        not_before=now - dt.timedelta(minutes=1), not_after=now + dt.timedelta(days=7),
        version=lambda d: tr.m.VersionInfo(1, f"https://sp1.example/suit/{tr.DTYPE}/1"),
        references=dict.fromkeys(ids, tr.measure(tr.FIRMWARE)),
    )  # fmt: skip
    tid, tm = sp2svc.accept(
        uil, peer_id=tr.SP1_ID, peer_certificate=sp1.identity.certificate,
        reset_not_before=now - dt.timedelta(minutes=1), reset_not_after=now + dt.timedelta(days=2),
        fallback_uri=tr.SP1_UPDATE, trust_anchors=[sp2.ca("root")],
    )  # fmt: skip
    sp1svc.accept(tm)
    msgs, _ = sp1svc.device_messages(tid)
    keep_messages(sp1.store, tid, msgs, now)
    return msgs, tm


async def _fetch_message(uri: str, door: CoapDoor, dev: Any, *, c509: bool) -> bytes:
    """The device asks SP1's cm for its transfer message with its operational credential."""
    cert_pem, key_pem = dev.tls_identity("operational")
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = x509.load_pem_x509_certificate(cert_pem)
    client = CoapEstClient(uri, responder_credential=door.credential_bytes, key=key, certificate=cert, c509=c509)
    async with client as c:
        return await c.transfer_message()


async def measure_transfer(n: int, tmp: Path, *, c509: bool) -> dict[str, object]:
    """The transfer in constrained form, per device: its transfer message from SP1's cm over CoAP
    (operational credential), then re-enrollment with CA2 through SP2's cm over CoAP (factory
    credential). Two providers with km in-process (bench/transfer.py's), a CoAP door each.
    ``c509``: the devices speak C509 (certificates, the compact sen, crts as a C509 bag)."""
    clock = SystemClock()
    sp1, sp2 = tr.Provider(tmp / "sp1", "SP1", tr.SP1_ID, clock), tr.Provider(tmp / "sp2", "SP2", tr.SP2_ID, clock)
    await sp1.start()
    await sp2.start()
    doors = [await _door(sp1, clock, transfer=True), await _door(sp2, clock, transfer=False)]
    udp1, udp2 = Tally(), Tally()
    try:
        async with udp_proxy(doors[0].port, udp1) as p1, udp_proxy(doors[1].port, udp2) as p2:
            uri2 = f"coap://127.0.0.1:{p2}"
            registrar = FactoryRegistry(sp2.store, clock, enroll_uri=uri2)
            registrar.register_cas([sp1.ca("root"), sp1.ca("factory")], actor="bench")
            sp1svc = Sp1Service(store=sp1.store, identity=sp1.identity, clock=clock, fallback_uri=tr.SP1_UPDATE)
            sp2svc = Sp2Service(store=sp2.store, identity=sp2.identity, clock=clock, registrar=registrar)
            devices = await tr.provision(sp1, tmp, n, tmp / "devices")
            msgs, tm = _messages(sp1, sp2, sp1svc, sp2svc, sorted(devices))
            enroller = CoapEnroller({uri2: doors[1].credential_bytes}, c509=c509)
            fallback = LocalFallback({tr.SP1_UPDATE: sp1svc})
            runs = []
            for d in sorted(devices):
                token = await _fetch_message(f"coap://127.0.0.1:{p1}", doors[0], devices[d], c509=c509)
                await asyncio.sleep(0.02)
                agent = DeviceAgent(devices[d], clock=clock, enroller=enroller, fallback=fallback, retry_delay=0.0)
                receipt = await agent.handle(token)
                assert receipt.phase == "committed", receipt
                await asyncio.sleep(0.02)
                runs.append((udp1.take(), udp2.take()))
    finally:
        for door in doors:
            await door.stop()
        for p in (sp1, sp2):
            await p.stop()
            p.store.close()
    return {"runs": runs, "message": len(next(iter(msgs.values()))), "transfer_message": len(tm)}


Runs = list[tuple[list[tuple[str, int]], list[tuple[str, int]]]]


def _medians(runs: Runs) -> tuple[float, float]:
    """(enrollment, re-enrollment) bytes, medians over the devices."""
    med = statistics.median
    return med(sum(b for _, b in r[0]) for r in runs), med(sum(b for _, b in r[1]) for r in runs)


def markdown(res: dict[str, object], n: int, seconds: float) -> tuple[str, list[Headline]]:
    est: list[tuple[int, int]] = res["est"]  # type: ignore[assignment]
    coap: Runs = res["coap"]  # type: ignore[assignment]
    c509: Runs = res["c509"]  # type: ignore[assignment]
    med = statistics.median
    est_enroll, est_re = med(e[0] for e in est), med(e[1] for e in est)
    coap_enroll, coap_re = _medians(coap)
    c509_enroll, c509_re = _medians(c509)
    info = machine_info()
    lines = [
        "## Enrollment bytes on the wire: CoAP/EDHOC/OSCORE (DER, C509) against EST over HTTPS (issue 17)",
        "",
        f"{n} device(s), each enrolling then re-enrolling each way on fresh sessions; medians. Counted: UDP "
        "payloads (whole CoAP messages) and TLS stream bytes (handshake and records), no IP/UDP/TCP headers. "
        "EST is DER; CoAP runs with DER certificates (sent in pn and again in sen) and as a C509 device (the "
        "certificate as C509 in pn only, the compact sen, the issued certificate in C509; ADR 0029). "
        f"{info['nproc']} cores; run took {seconds:.0f} s.",
        "",
        md_table(
            [
                "exchange",
                "EST / HTTPS / TLS 1.3 / DER",
                "CoAP / EDHOC / OSCORE / DER",
                "CoAP / EDHOC / OSCORE / C509",
                "ratio C509 / EST",
                "ratio C509 / CoAP DER",
            ],
            [
                [
                    "enrollment (simpleenroll / sen)",
                    f"{est_enroll:,.0f} B",
                    f"{coap_enroll:,.0f} B",
                    f"{c509_enroll:,.0f} B",
                    f"{c509_enroll / est_enroll:.2f}x",
                    f"{c509_enroll / coap_enroll:.2f}x",
                ],
                [
                    "re-enrollment (simplereenroll / sren)",
                    f"{est_re:,.0f} B",
                    f"{coap_re:,.0f} B",
                    f"{c509_re:,.0f} B",
                    f"{c509_re / est_re:.2f}x",
                    f"{c509_re / coap_re:.2f}x",
                ],
            ],
        ),
        "",
        "Every CoAP datagram of one enrollment, DER then C509:",
        "",
        md_table(["datagram", "what the path sees", "bytes"], [[i + 1, d, b] for i, (d, b) in enumerate(coap[0][0])]),
        "",
        md_table(["datagram", "what the path sees", "bytes"], [[i + 1, d, b] for i, (d, b) in enumerate(c509[0][0])]),
        "",
        "EDHOC message_2 is the answer to message_1; OSCORE requests larger than 512 bytes go in inner "
        "Block1 blocks (each answered 2.31 Continue, inside OSCORE), so large requests take several datagrams.",
        "",
        md_table(
            ["Table I (seed 003), EDHOC/C509 column", "paper", "here"],
            [
                [
                    "factory certificate",
                    TABLE_I["factory certificate"],
                    f"{res['factory_c509']} B C509 ({res['factory_der']} B DER, P-256)",
                ],
                [
                    "DeviceUpdateInfo",
                    TABLE_I["DeviceUpdateInfo"],
                    "provider to provider (in the UpdateInfoList), never to a device: `bench/transfer_sizes.py`",
                ],
            ],
        ),
    ]
    lines += ["", *transfer_markdown(res, coap[0][0], c509[0][0])]
    heads = [
        Headline(
            what="CoAP/EDHOC/OSCORE/C509 enrollment, bytes on the wire",
            paper="seed 003 Table I (EDHOC/C509)",
            target="<= 1x",
            measured=f"{c509_enroll:,.0f} B",
            verdict="met" if c509_enroll <= est_enroll else "missed",
            yardstick=f"EST over HTTPS/TLS 1.3/DER: {est_enroll:,.0f} B",
            ratio=round(c509_enroll / est_enroll, 3),
        )
    ]
    return "\n".join(lines), heads


def _transfer_figures(tr_res: dict[str, object], enrollment: list[tuple[str, int]]) -> list[str]:
    """The column of one run: message, its fetch, handshake, enrollment, re-enrollment with CA2, total."""
    runs: Runs = tr_res["runs"]  # type: ignore[assignment]
    med = statistics.median
    tm_total, re_total = _medians(runs)
    tm_hs = med(handshake_bytes(r[0]) for r in runs)
    re_hs = med(handshake_bytes(r[1]) for r in runs)
    hs = handshake_bytes(enrollment)
    return [
        f"{tr_res['message']} B",
        f"{tm_total:,.0f} B (handshake {tm_hs:,.0f} B)",
        f"{hs:,.0f} B",
        f"{sum(b for _, b in enrollment) - hs:,.0f} B",
        f"{re_total:,.0f} B (handshake {re_hs:,.0f} B)",
        f"{tm_total + re_total:,.0f} B",
    ]


def transfer_markdown(
    res: dict[str, object], enrollment: list[tuple[str, int]], enrollment_c509: list[tuple[str, int]]
) -> list[str]:
    """The transfer in constrained form beside Table I's EDHOC/C509 column (medians per device)."""
    der: dict[str, object] = res["transfer"]  # type: ignore[assignment]
    c509: dict[str, object] = res["transfer_c509"]  # type: ignore[assignment]
    names = [
        ("TransferMessage (the per-device CWT a device gets)", "> 216"),
        ("  fetched over CoAP: EDHOC + OSCORE request (certificate) + answer", ""),
        ("Handshake (EDHOC)", "> 575"),
        ("Enrollment (nonce + sen, after the handshake)", "> 550"),
        ("re-enrollment with CA2 (EDHOC + pn + sen + crts)", ""),
        ("Total size for an IoT device (message + re-enrollment)", "> 1340"),
    ]
    cols = zip(_transfer_figures(der, enrollment), _transfer_figures(c509, enrollment_c509), strict=True)
    rows = [[name, paper, a, b] for (name, paper), (a, b) in zip(names, cols, strict=True)]
    runs: Runs = der["runs"]  # type: ignore[assignment]
    return [
        "### The transfer in constrained form, per device, beside Table I (EDHOC, C509 column)",
        "",
        f"{len(runs)} device(s) of SP1 fetch their per-device transfer message from SP1's cm (`/transfer/tm`, "
        "operational credential), then re-enroll with CA2 through SP2's cm (`sen` with the factory credential, "
        "then `crts`), each over a new EDHOC session; attestation and the update are left out. Handshake = "
        "EDHOC message_1 + message_2 + message_3; enrollment = the rest of the session.",
        "",
        md_table(
            [
                "message / operation",
                "Table I, EDHOC/C509",
                "here: CoAP/EDHOC/OSCORE, DER",
                "here: CoAP/EDHOC/OSCORE, C509",
            ],
            rows,
        ),
        "",
        f"(the TransferMessage SP2 signs for SP1, provider to provider: {der['transfer_message']} B)",
    ]


def main() -> None:
    def extra(p: argparse.ArgumentParser) -> None:
        p.add_argument("--devices", type=int, default=None, help="devices measured (default 5; 1 with --quick)")

    args = parse_args(__doc__ or "", extra)
    n = args.devices or (1 if args.quick else 5)
    t0 = time.perf_counter()
    res = asyncio.run(measure(n))
    for key, c509 in (("transfer", False), ("transfer_c509", True)):
        with tempfile.TemporaryDirectory(prefix="iotdlm-coap-transfer-") as tmp:
            res[key] = asyncio.run(measure_transfer(n, Path(tmp), c509=c509))
    text, heads = markdown(res, n, time.perf_counter() - t0)
    emit(text, args, heads)


if __name__ == "__main__":
    main()
