"""NATS-only behaviour: server-side permissions, credentials, TLS, a crashed server, the config."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import os
import re
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm import errors
from iotdlm.bus import subjects
from iotdlm.bus.api import Message
from iotdlm.bus.nats import NatsBus, connect
from iotdlm.bus.server import (
    JETSTREAM_API,
    EmbeddedNatsServer,
    NatsServerConfig,
    NatsUser,
    find_nats_server,
    free_port,
    generate_users,
    quote,
    render_config,
)
from iotdlm.clock import SystemClock
from tests.fixtures_nats import NatsBusFactory, RunningNats, start_nats

WAIT = 10.0


async def _const(value: bytes) -> bytes:
    return value


async def _eventually(check: Callable[[], bool]) -> None:
    async def loop() -> None:
        while not check():  # noqa: ASYNC110 - polls a file the server writes, nothing to wait on
            await asyncio.sleep(0.02)

    await asyncio.wait_for(loop(), WAIT)


# --- permissions are enforced by the server ---------------------------------------------------


@pytest.mark.nats
async def test_server_drops_a_publish_outside_permissions(
    nats_server: RunningNats, nats_bus_factory: NatsBusFactory
) -> None:
    km = await nats_bus_factory("km")
    # no confirmation: the client sends the PUB and nothing on our side stops it
    pm = await nats_bus_factory("pm", confirm_publish=False)
    got: list[str] = []

    async def record(msg: Message) -> None:
        got.append(msg.subject)

    await km.subscribe(f"{subjects.PREFIX}.km.>", record)
    await pm.publish(subjects.KM_REVOKE, b"revoke everything")  # refused by the server
    await pm.publish(subjects.KM_ISSUE, b"allowed")  # same connection, sent after
    await _eventually(lambda: subjects.KM_ISSUE in got)
    assert got == [subjects.KM_ISSUE]
    await _eventually(lambda: "Publish Violation" in nats_server.server.stderr_tail())
    assert subjects.KM_REVOKE in nats_server.server.stderr_tail()


@pytest.mark.nats
@pytest.mark.parametrize(
    ("module", "pattern"),
    [
        ("sm", f"{subjects.PREFIX}.km.>"),
        ("pm", f"{subjects.inbox_prefix('km')}.>"),
        ("cm", f"{subjects.EVENTS}.>"),
    ],
)
async def test_server_refuses_a_subscription_outside_permissions(
    nats_server: RunningNats, nats_bus_factory: NatsBusFactory, module: str, pattern: str
) -> None:
    bus = await nats_bus_factory(module)

    async def never(msg: Message) -> None:
        raise AssertionError("a refused subscription must not deliver")

    with pytest.raises(errors.PermissionDeniedError, match=re.escape(pattern)):
        await bus.subscribe(pattern, never)
    # the refusal came from the server (NatsBus keeps no permission table of its own)
    await _eventually(lambda: "Subscription Violation" in nats_server.server.stderr_tail())
    assert pattern in nats_server.server.stderr_tail()
    # the connection stays usable
    await bus.publish(subjects.events(module, "still_alive"), b"")


@pytest.mark.nats
async def test_replies_travel_on_the_module_inbox(nats_server_module: RunningNats) -> None:
    """Each module may subscribe only below its own _INBOX.<module>, so requests must use it."""
    buses = [await nats_server_module.connect(m) for m in ("km", "pm", "cm", "admin")]
    km, pm, cm, admin = buses
    try:
        await km.serve(subjects.KM_CHAIN, lambda m: _const(b"chain"))
        for requester in (pm, cm, admin):
            assert await requester.request(subjects.KM_CHAIN, b"") == b"chain"
    finally:
        for bus in buses:
            await bus.close()


@pytest.mark.nats
async def test_handler_concurrency_is_bounded(nats_server_module: RunningNats) -> None:
    km = await nats_server_module.connect("km", max_concurrent_handlers=2)
    pm = await nats_server_module.connect("pm")
    running = 0
    peak = 0
    gate = asyncio.Event()

    async def handle(msg: Message) -> bytes:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1
        return msg.data

    try:
        await km.serve(subjects.KM_ISSUE, handle)
        requests = [asyncio.create_task(pm.request(subjects.KM_ISSUE, bytes([i]), timeout=WAIT)) for i in range(5)]
        await _eventually(lambda: running == 2)
        # round trips through the server on both connections: all five requests have reached
        # km's client by now, and three of them must be waiting for a free slot
        await pm.publish(subjects.events("pm", "sync"), b"")
        await km.publish(subjects.events("km", "sync"), b"")
        for _ in range(20):
            await asyncio.sleep(0)
        assert running == 2
        gate.set()
        assert await asyncio.gather(*requests) == [bytes([i]) for i in range(5)]
        assert peak == 2
    finally:
        await km.close()
        await pm.close()


# --- connection failures ----------------------------------------------------------------------


@pytest.mark.nats
async def test_wrong_password_fails_to_connect(nats_server: RunningNats) -> None:
    with pytest.raises(errors.UnavailableError) as info:
        await connect(nats_server.url, module="km", user="km", password="not-the-password")
    assert nats_server.url in info.value.message
    assert "credentials" in info.value.message


@pytest.mark.nats
async def test_another_modules_password_does_not_work(nats_server: RunningNats) -> None:
    with pytest.raises(errors.UnavailableError):
        await connect(nats_server.url, module="km", user="km", password=nats_server.users["pm"].password)


async def test_no_server_fails_fast_with_the_url() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    with pytest.raises(errors.UnavailableError) as info:
        await asyncio.wait_for(connect(url, module="km", user="km", password="x"), WAIT)
    assert url in info.value.message
    assert "running" in info.value.message


@pytest.mark.nats
async def test_killed_server_makes_requests_unavailable_then_recovers(nats_server: RunningNats) -> None:
    km = await nats_server.connect("km", reconnect_time_wait=0.05)
    pm = await nats_server.connect("pm", reconnect_time_wait=0.05)
    try:
        await km.serve(subjects.KM_CHAIN, lambda m: _const(b"chain"))
        assert await pm.request(subjects.KM_CHAIN, b"") == b"chain"

        nats_server.server.kill()
        with pytest.raises(errors.UnavailableError):
            await asyncio.wait_for(pm.request(subjects.KM_CHAIN, b"", timeout=0.5), WAIT)
        with pytest.raises(errors.UnavailableError):
            await asyncio.wait_for(pm.request(subjects.KM_CHAIN, b"", timeout=0.5), WAIT)

        # same port, same users: both reconnect and km's subscription is replayed
        nats_server.server.start()

        async def until_answered() -> bytes:
            while True:
                try:
                    return await pm.request(subjects.KM_CHAIN, b"", timeout=0.5)
                except errors.UnavailableError:
                    await asyncio.sleep(0.05)

        assert await asyncio.wait_for(until_answered(), WAIT) == b"chain"
    finally:
        await km.close()
        await pm.close()
    with pytest.raises(errors.UnavailableError):
        await pm.request(subjects.KM_CHAIN, b"")


# --- TLS --------------------------------------------------------------------------------------


def _write_pki(directory: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for IP 127.0.0.1, and a client certificate."""
    now = SystemClock().now()

    def make(
        cn: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey, *, ca: bool
    ) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            b = b.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            ).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        return b.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "iotdlm test bus CA")])
    ca = make("iotdlm test bus CA", ca_key, ca_name, ca_key, ca=True)
    out: dict[str, Path] = {"ca": directory / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = make("127.0.0.1", key, ca_name, ca_key, ca=False)
        out[f"{role}_cert"] = directory / f"{role}.pem"
        out[f"{role}_key"] = directory / f"{role}.key"
        out[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{role}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return out


@pytest.mark.real_clock
@pytest.mark.nats
async def test_tls_client_trusting_the_ca_connects_and_others_do_not(tmp_path: Path) -> None:
    pki = _write_pki(tmp_path)
    running = start_nats(tmp_path, tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    try:
        assert running.url.startswith("tls://127.0.0.1:")
        trusting = ssl.create_default_context(cafile=str(pki["ca"]))
        km = await running.connect("km", tls=trusting)
        pm = await running.connect("pm", tls=trusting)
        try:
            await km.serve(subjects.KM_CHAIN, lambda m: _const(b"over tls"))
            assert await pm.request(subjects.KM_CHAIN, b"") == b"over tls"
        finally:
            await km.close()
            await pm.close()

        with pytest.raises(errors.UnavailableError) as info:
            await running.connect("km", tls=ssl.create_default_context())  # system CAs only
        assert running.url in info.value.message
    finally:
        running.server.stop()


@pytest.mark.real_clock
@pytest.mark.nats
async def test_tls_with_client_certificates(tmp_path: Path) -> None:
    pki = _write_pki(tmp_path)
    with_cert = ssl.create_default_context(cafile=str(pki["ca"]))
    with_cert.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    running = start_nats(
        tmp_path,
        client_tls=with_cert,
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        tls_ca=pki["ca"],
        verify_clients=True,
    )
    try:
        bus = await running.connect("admin", tls=with_cert)
        await bus.close()
        without_cert = ssl.create_default_context(cafile=str(pki["ca"]))
        with pytest.raises(errors.UnavailableError):
            await running.connect("admin", tls=without_cert)
    finally:
        running.server.stop()


async def _plain_greeting(host: str, port: int) -> bytes:
    """What a plain-text client reads from the server within a second, then after its CONNECT."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        with contextlib.suppress(TimeoutError):
            greeting = await asyncio.wait_for(reader.read(4096), 1.0)
            return greeting
        writer.write(b'CONNECT {"user":"km","pass":"x"}\r\nPING\r\n')
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        try:
            after = await asyncio.wait_for(reader.read(4096), WAIT)
        except ConnectionError:
            after = b""
        return b"after CONNECT: " + after
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.mark.real_clock
@pytest.mark.nats
async def test_tls_server_speaks_tls_first_and_refuses_a_plain_text_client(tmp_path: Path) -> None:
    """With TLS the server expects the TLS handshake first (``handshake_first``): it greets no
    plain-text client (no INFO an attacker could imitate without ``tls_required``), cuts off one that
    sends CONNECT in clear, and a client that waits for a plain greeting before TLS cannot connect."""
    pki = _write_pki(tmp_path)
    running = start_nats(tmp_path, tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    try:
        cfg = running.server.config
        assert await _plain_greeting(cfg.host, cfg.port) == b"after CONNECT: "
        trusting = ssl.create_default_context(cafile=str(pki["ca"]))
        with pytest.raises(errors.UnavailableError):
            await running.connect("km", tls=trusting, tls_handshake_first=False, connect_timeout=1.0)
        bus = await running.connect("km", tls=trusting)  # TLS first: the default
        await bus.close()
    finally:
        running.server.stop()


class _StrippingServer:
    """An attacker answering on the NATS port as a plain server: its greeting does not ask for TLS
    (``tls_required`` absent), and it records everything a client sends."""

    def __init__(self) -> None:
        self.received = b""
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> _StrippingServer:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b'INFO {"server_id":"x","version":"2.10.0","proto":1,"max_payload":1048576,"auth_required":true}\r\n'
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            while chunk := await asyncio.wait_for(reader.read(4096), WAIT):
                self.received += chunk
                if b"PING" in self.received:
                    writer.write(b"PONG\r\n")
                    await writer.drain()
        writer.close()


@pytest.mark.real_clock
@pytest.mark.nats
@pytest.mark.parametrize("handshake_first", [True, False], ids=["tls-first", "upgrade-on-info"])
async def test_attack_tls_stripping_server_gets_no_password(tmp_path: Path, handshake_first: bool) -> None:
    """An active attacker answering as the NATS server with a plain greeting that does not ask for
    TLS: a client that starts with the TLS handshake (``connect``'s default) sends it no password;
    the control case shows that nats-py's upgrade on INFO would have sent it in clear."""
    pki = _write_pki(tmp_path)
    trusting = ssl.create_default_context(cafile=str(pki["ca"]))
    async with _StrippingServer() as attacker:
        url = f"tls://127.0.0.1:{attacker.port}"
        with contextlib.suppress(errors.UnavailableError):
            bus = await connect(
                url,
                module="km",
                user="km",
                password="s3cret-pw",
                tls=trusting,
                tls_handshake_first=handshake_first,
                connect_timeout=2.0,
            )
            await bus.close()
    if handshake_first:
        assert b"s3cret-pw" not in attacker.received
        assert b"CONNECT" not in attacker.received
    else:
        assert b"s3cret-pw" in attacker.received


# --- JetStream --------------------------------------------------------------------------------


@pytest.mark.nats
async def test_jetstream_api_allowed_only_when_jetstream_is_on(tmp_path: Path, nats_server: RunningNats) -> None:
    """Without JetStream a module has no JetStream API at all; with it, only its own read path
    (the mode bucket's stream info here), never the account-wide API (issue 11)."""
    mode_info = f"$JS.API.STREAM.INFO.{subjects.kv_stream(subjects.MODE_BUCKET)}"
    km = await nats_server.connect("km")
    try:
        with pytest.raises(errors.PermissionDeniedError):
            await km.request(mode_info, b"")
    finally:
        await km.close()

    running = start_nats(tmp_path / "js", jetstream_dir=tmp_path / "js" / "store")
    try:
        km = await running.connect("km")
        try:
            info = json.loads(await km.request(mode_info, b""))
            with pytest.raises(errors.PermissionDeniedError):
                await km.request("$JS.API.INFO", b"")
        finally:
            await km.close()
        assert info.get("type") == "io.nats.jetstream.api.v1.stream_info_response"
    finally:
        running.server.stop()


# --- the embedded server ----------------------------------------------------------------------


def test_find_nats_server_finds_an_executable() -> None:
    path = find_nats_server()
    assert os.access(path, os.X_OK)


@pytest.mark.nats
def test_start_failure_reports_the_server_output(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = EmbeddedNatsServer(NatsServerConfig(port=port, users=generate_users(["km"])), tmp_path / "nats.conf")
        with pytest.raises(RuntimeError, match=r"(?i)address already in use"):
            server.start()
    assert not server.running
    assert server.pid is None


class ImpostorNats:
    """Another NATS-like server on the port: greets like nats-server, records what clients send."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen()
        self.port: int = self.sock.getsockname()[1]
        self.received = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b'INFO {"server_id":"IMPOSTOR","server_name":"impostor","version":"2.10.0"}\r\n')
                conn.settimeout(0.2)
                with contextlib.suppress(OSError):
                    self.received += conn.recv(65536)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.mark.nats
def test_start_refuses_another_server_already_on_the_port(tmp_path: Path) -> None:
    """Issue 11: with the port taken by another (NATS-greeting) server, start() does not mistake
    it for ours (each start names the server with a fresh random name that the greeting must
    carry): it fails, saying another server answers, and nothing was sent to that server."""
    impostor = ImpostorNats()
    try:
        server = EmbeddedNatsServer(
            NatsServerConfig(port=impostor.port, users=generate_users(["km"])), tmp_path / "nats.conf"
        )
        with pytest.raises(RuntimeError, match="another server answers") as info:
            server.start()
        assert "no credentials were sent" in str(info.value)
    finally:
        impostor.close()
    assert not server.running
    assert impostor.received == b""


def test_render_config_server_name() -> None:
    cfg = NatsServerConfig(port=4222, server_name="iotdlm-0a1b")
    assert 'server_name: "iotdlm-0a1b"' in render_config(cfg)
    for bad in ("", "a b", 'x"y', "a\nb"):
        with pytest.raises(ValueError, match="server_name"):
            render_config(NatsServerConfig(port=4222, server_name=bad))


@pytest.mark.nats
def test_server_context_manager_and_stop(tmp_path: Path) -> None:
    cfg = NatsServerConfig(port=free_port(), users=generate_users(subjects.MODULES))
    conf = tmp_path / "nats.conf"
    with EmbeddedNatsServer(cfg, conf) as server:
        assert server.running
        assert server.pid is not None
        assert server.url == f"nats://127.0.0.1:{cfg.port}"
        assert conf.stat().st_mode & 0o077 == 0, "the config holds passwords: owner-only"
        with socket.create_connection(("127.0.0.1", cfg.port), timeout=WAIT) as s:
            assert s.recv(4) == b"INFO"
    assert not server.running
    server.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", cfg.port), timeout=WAIT):
        pass


@pytest.mark.nats
async def test_odd_passwords_survive_the_config(tmp_path: Path) -> None:
    odd = {
        "km": 'a"b\\c d#e{f}g[h]i,j;k:l=m',
        "pm": "$notavariable // not a comment\n\ttab",
        "sm": "include /etc/passwd",
        "cm": "ünïcødé €\x01\x7f'single'",
        "admin": "\\x41\\n",
    }
    users = [NatsUser(module=m, user=m, password=p) for m, p in odd.items()]
    running = start_nats(tmp_path, users=users)
    try:
        for module, password in odd.items():
            bus = await connect(running.url, module=module, user=module, password=password)
            await bus.close()
        with pytest.raises(errors.UnavailableError):
            await connect(running.url, module="admin", user="admin", password="A\n")
    finally:
        running.server.stop()


# --- render_config ----------------------------------------------------------------------------


def _unquote(text: str) -> str:
    """Reference reader of one nats-server double-quoted string (the lexer's escapes)."""
    assert text[0] == '"'
    assert text[-1] == '"'
    out: list[str] = []
    raw = text[1:-1]
    i = 0
    simple = {"t": "\t", "n": "\n", "r": "\r", '"': '"', "\\": "\\"}
    while i < len(raw):
        ch = raw[i]
        if ch == '"':
            raise AssertionError("unescaped quote inside a string")
        if ch in "\n\r":
            raise AssertionError("raw line break inside a string")
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        nxt = raw[i + 1]
        if nxt == "x":
            out.append(chr(int(raw[i + 2 : i + 4], 16)))
            i += 4
        else:
            out.append(simple[nxt])
            i += 2
    return "".join(out)


_TEXT = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)


@settings(max_examples=300)
@given(_TEXT)
def test_quote_round_trips_any_text(value: str) -> None:
    q = quote(value)
    assert _unquote(q) == value
    assert "\n" not in q
    assert "\r" not in q


@settings(max_examples=100)
@given(st.lists(_TEXT.filter(lambda p: not p.startswith("$2")), min_size=5, max_size=5))
def test_render_config_quotes_every_password(passwords: list[str]) -> None:
    users = [NatsUser(module=m, user=m, password=p) for m, p in zip(subjects.MODULES, passwords, strict=True)]
    text = render_config(NatsServerConfig(port=4222, users=users))
    found = re.findall(r'^\s*password: ("(?:[^"\\\n]|\\.)*")$', text, flags=re.MULTILINE)
    assert [_unquote(q) for q in found] == passwords


def test_render_config_permissions_follow_the_table() -> None:
    users = generate_users(subjects.MODULES)
    text = render_config(NatsServerConfig(port=4222, users=users))
    blocks = text.split("user: ")[1:]
    assert len(blocks) == len(subjects.MODULES)
    for module, block in zip(subjects.MODULES, blocks, strict=True):
        perms = subjects.PERMISSIONS[module]
        pub = re.search(r"publish: \{ allow: (\[.*?\])(?:, deny: (\[.*?\]))? \}", block)
        sub = re.search(r"subscribe: \{ allow: (\[.*\]) \}", block)
        assert pub is not None
        assert sub is not None
        assert json.loads(pub.group(1)) == list(perms.publish)
        assert json.loads(pub.group(2) or "[]") == list(perms.deny_publish)
        assert json.loads(sub.group(1)) == list(perms.subscribe)
        assert ("allow_responses: true" in block) == perms.allow_responses
    assert JETSTREAM_API not in text
    assert "jetstream" not in text
    assert "tls" not in text


def test_render_config_jetstream_and_tls(tmp_path: Path) -> None:
    cfg = NatsServerConfig(
        port=4222,
        users=generate_users(["km", "pm"]),
        jetstream_dir=tmp_path / "js",
        tls_cert=tmp_path / "c.pem",
        tls_key=tmp_path / "k.pem",
        http_port=8222,
    )
    text = render_config(cfg)
    # each user gets its own JetStream API subjects, never the whole API (issue 11)
    assert quote(JETSTREAM_API) not in text
    for module in ("km", "pm"):
        for api in subjects.PERMISSIONS[module].jetstream:
            assert quote(api) in text
    assert f"store_dir: {quote(str(tmp_path / 'js'))}" in text
    assert f"cert_file: {quote(str(tmp_path / 'c.pem'))}" in text
    assert "verify: false" in text
    assert "handshake_first: true" in text  # nothing in plain text (an attacker cannot strip TLS)
    assert 'http: "127.0.0.1:8222"' in text
    assert EmbeddedNatsServer(cfg, tmp_path / "n.conf").url == "tls://127.0.0.1:4222"


def test_render_config_ipv6_loopback(tmp_path: Path) -> None:
    cfg = NatsServerConfig(port=4222, host="::1", http_port=8222)
    text = render_config(cfg)
    assert 'host: "::1"' in text
    assert 'http: "[::1]:8222"' in text
    assert EmbeddedNatsServer(cfg, tmp_path / "n.conf").url == "nats://[::1]:4222"


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (NatsServerConfig(port=4222, host="0.0.0.0"), "loopback"),  # noqa: S104 - the point of the test
        (NatsServerConfig(port=4222, host="10.0.0.1"), "loopback"),
        (NatsServerConfig(port=4222, host="localhost"), "loopback"),
        (NatsServerConfig(port=0), "port"),
        (NatsServerConfig(port=4222, users=[NatsUser("nobody", "x", "y")]), "unknown module"),
        (NatsServerConfig(port=4222, users=[NatsUser("km", "km", "$2a$11$hash")]), "must not start"),
        (NatsServerConfig(port=4222, users=[NatsUser("km", "a", "x"), NatsUser("pm", "a", "y")]), "duplicate"),
        (NatsServerConfig(port=4222, tls_cert=Path("c.pem")), "both tls_cert and tls_key"),
        (NatsServerConfig(port=4222, verify_clients=True), "need tls_cert"),
    ],
)
def test_render_config_rejects_unsafe_settings(bad: NatsServerConfig, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        render_config(bad)


def test_generate_users_gives_distinct_random_passwords() -> None:
    users = generate_users(subjects.MODULES)
    assert [u.module for u in users] == list(subjects.MODULES)
    assert [u.user for u in users] == list(subjects.MODULES)
    assert len({u.password for u in users}) == len(users)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{32}", u.password) for u in users)
    assert all(u.password not in repr(u) for u in users)


@pytest.mark.nats
async def test_bus_exposes_its_connection(nats_bus_factory: NatsBusFactory, nats_server: RunningNats) -> None:
    bus = await nats_bus_factory("cm")
    assert isinstance(bus, NatsBus)
    assert bus.url == nats_server.url
    assert bus.is_connected
    assert bus.max_payload == 8 * 1024 * 1024
    await bus.close()
    assert bus.is_closed
    await bus.close()  # idempotent


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


_LOST_OWNER = """
import sys
from pathlib import Path
from iotdlm.bus.server import EmbeddedNatsServer, NatsServerConfig, free_port, generate_users

def set_up():
    server = EmbeddedNatsServer(NatsServerConfig(port=free_port(), users=generate_users(["km"])),
                                Path(sys.argv[1]) / "nats.conf")
    server.start()
    print(server.pid, flush=True)
    raise RuntimeError("set-up failed after the server started")

{how}
"""


@pytest.mark.nats
@pytest.mark.parametrize(
    "how",
    [
        "try:\n    set_up()\nexcept RuntimeError:\n    pass\nimport time; time.sleep(0.2)\nprint('alive', flush=True)",
        "set_up()",
    ],
    ids=["owner-collected", "interpreter-exits-on-the-error"],
)
def test_a_server_whose_owner_is_lost_does_not_outlive_it(tmp_path: Path, how: str) -> None:
    """A test whose set-up fails after starting nats-server must not leave the process behind."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _LOST_OWNER.format(how=how), str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "set-up failed" in proc.stderr or "alive" in proc.stdout, proc.stderr
    pid = int(proc.stdout.split()[0])
    assert not _alive(pid), f"nats-server {pid} outlived its owner"
