"""sm's egress through cm: the forward proxy and its allow-list, on loopback with a tiny aiohttp
"repository" (plain and TLS), aiohttp and urllib3 (sm's fetcher) as clients; the head parser is
pure and fuzzed."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import urllib3
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from iotdlm.clock import SystemClock
from iotdlm.cm.config import EgressConfig
from iotdlm.cm.egress import (
    AllowList,
    EgressProxy,
    Origin,
    ProxyRequest,
    parse_head,
    parse_origin,
    rewrite_head,
    target_origin,
)
from iotdlm.errors import BadRequestError
from iotdlm.pki.keys import Algorithm, generate_key, private_key_to_pem


# --- pure parts ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://repo.example.com", Origin("https", "repo.example.com", 443)),
        ("https://Repo.Example.com:8443/", Origin("https", "repo.example.com", 8443)),
        ("http://127.0.0.1:9000", Origin("http", "127.0.0.1", 9000)),
        ("http://[::1]:81", Origin("http", "::1", 81)),
    ],
)
def test_parse_origin(url: str, origin: Origin) -> None:
    assert parse_origin(url) == origin


@pytest.mark.parametrize(
    "url",
    ["ftp://x", "https://u:p@x", "https://x/path", "https://x?q", "https://", "x.example.com", "https://x:99999"],
)
def test_parse_origin_refuses(url: str) -> None:
    with pytest.raises(ValueError, match="origin"):
        parse_origin(url)


def _head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize(
    ("head", "origin"),
    [
        (_head("CONNECT repo.example.com:443 HTTP/1.1", "Host: repo.example.com:443"), "https://repo.example.com:443"),
        (_head("CONNECT [::1]:8443 HTTP/1.1"), "https://[::1]:8443"),
        (_head("GET http://REPO.example.com/a?b=1 HTTP/1.1", "Host: x"), "http://repo.example.com:80"),
        (_head("POST http://127.0.0.1:9000/report HTTP/1.0", "Content-Length: 3"), "http://127.0.0.1:9000"),
    ],
)
def test_target_origin(head: bytes, origin: str) -> None:
    assert str(target_origin(parse_head(head))) == origin


@pytest.mark.parametrize(
    ("head", "match"),
    [
        (b"GET / HTTP/1.1\r\n", "not terminated"),
        (_head("GET http://x/ HTTP/2"), "HTTP/1"),
        (_head("get http://x/ HTTP/1.1"), "method"),
        (_head("GET  http://x/ HTTP/1.1"), "request line"),
        (_head("GET http://x/\x01 HTTP/1.1"), "target"),
        (_head("GET http://x/ HTTP/1.1", "Bad Header: x"), "header"),
        (_head("GET http://x/ HTTP/1.1", "NoColon"), "header"),
        (_head("GET http://x/ HTTP/1.1", "X: a\x00b"), "control"),
        (_head("POST http://x/ HTTP/1.1", "Content-Length: 3", "Transfer-Encoding: chunked"), "ambiguous"),
        (_head("POST http://x/ HTTP/1.1", "Content-Length: 3", "Content-Length: 4"), "ambiguous"),
        (_head("POST http://x/ HTTP/1.1", "Content-Length: -3"), "Content-Length"),
        ("GET http://x/é HTTP/1.1\r\n\r\n".encode(), "ASCII"),
    ],
)
def test_parse_head_refuses(head: bytes, match: str) -> None:
    with pytest.raises(BadRequestError, match=match):
        parse_head(head)


@pytest.mark.parametrize(
    ("head", "match"),
    [
        (_head("GET /path HTTP/1.1", "Host: repo"), "not a proxy request"),
        (_head("GET https://repo/ HTTP/1.1"), "not a proxy request"),
        (_head("CONNECT repo HTTP/1.1"), "host:port"),
        (_head("CONNECT user@repo:443 HTTP/1.1"), "host:port"),
        (_head("CONNECT repo:443/x HTTP/1.1"), "host:port"),
        (_head("CONNECT repo:99999 HTTP/1.1"), "port"),
        (_head("GET http://u:p@repo/ HTTP/1.1"), "user information"),
    ],
)
def test_target_origin_refuses(head: bytes, match: str) -> None:
    with pytest.raises(BadRequestError, match=match):
        target_origin(parse_head(head))


def test_rewrite_head_drops_hop_by_hop_and_sets_host() -> None:
    req = parse_head(
        _head(
            "GET http://repo.example.com:8080/targets/x.json?v=1 HTTP/1.1",
            "Host: evil.example.com",
            "Proxy-Authorization: Basic eA==",
            "Proxy-Connection: keep-alive",
            "Connection: keep-alive",
            "Accept: */*",
            "User-Agent: iotdlm-sm",
        )
    )
    out = rewrite_head(req, target_origin(req)).decode()
    assert out == (
        "GET /targets/x.json?v=1 HTTP/1.1\r\nHost: repo.example.com:8080\r\nAccept: */*\r\n"
        "User-Agent: iotdlm-sm\r\nConnection: close\r\n\r\n"
    )
    req = parse_head(_head("GET http://repo HTTP/1.1"))
    assert rewrite_head(req, target_origin(req)).startswith(b"GET / HTTP/1.1\r\nHost: repo\r\n")


@given(st.binary(max_size=300))
def test_parse_head_takes_any_bytes(data: bytes) -> None:
    for head in (data, data + b"\r\n\r\n"):
        try:
            req = parse_head(head)
        except BadRequestError:
            continue
        assert isinstance(req, ProxyRequest)
        try:
            origin = target_origin(req)
        except BadRequestError:
            continue
        assert origin.scheme in ("http", "https")
        if req.method != "CONNECT":
            assert rewrite_head(req, origin).endswith(b"Connection: close\r\n\r\n")


@given(
    method=st.sampled_from(["GET", "POST", "HEAD", "CONNECT"]),
    host=st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True),
    port=st.integers(1, 65535),
)
def test_allow_list_is_exact_on_scheme_host_and_port(method: str, host: str, port: int) -> None:
    allow = AllowList([f"https://{host}:{port}", f"http://{host}:{port}"])
    target = f"{host}:{port}" if method == "CONNECT" else f"http://{host}:{port}/x"
    origin = target_origin(parse_head(_head(f"{method} {target} HTTP/1.1")))
    assert allow.allows(origin)
    assert not allow.allows(Origin(origin.scheme, origin.host, port % 65535 + 1))
    assert not allow.allows(Origin(origin.scheme, origin.host + "x", port))


# --- the proxy on loopback -----------------------------------------------------------------------
def _self_signed() -> tuple[bytes, bytes]:
    key = generate_key(Algorithm.P256)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "repo")])
    now = SystemClock().now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.PEM), private_key_to_pem(key, None)


@dataclass
class Repo:
    http_origin: str
    https_origin: str
    other_origin: str
    trust: ssl.SSLContext
    cert_pem: Path


async def _repository_app() -> web.Application:
    async def meta(request: web.Request) -> web.Response:
        return web.json_response({"version": 3, "path": request.path_qs, "host": request.host})

    async def report(request: web.Request) -> web.Response:
        return web.json_response({"received": len(await request.read())})

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"first")
        await asyncio.sleep(30)
        return resp

    app = web.Application()
    app.router.add_get("/meta.json", meta)
    app.router.add_post("/report", report)
    app.router.add_get("/slow", slow)
    return app


@pytest.fixture
async def repo(tmp_path: Path) -> AsyncIterator[Repo]:
    cert_pem, key_pem = _self_signed()
    (tmp_path / "repo.pem").write_bytes(cert_pem)
    (tmp_path / "repo.key").write_bytes(key_pem)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(tmp_path / "repo.pem"), str(tmp_path / "repo.key"))
    runners = []
    ports = []
    for ctx in (None, server_ctx, None):
        runner = web.AppRunner(await _repository_app(), shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        runners.append(runner)
        ports.append(site.port)
    trust = ssl.create_default_context(cafile=str(tmp_path / "repo.pem"))
    try:
        yield Repo(
            http_origin=f"http://127.0.0.1:{ports[0]}",
            https_origin=f"https://127.0.0.1:{ports[1]}",
            other_origin=f"http://127.0.0.1:{ports[2]}",
            trust=trust,
            cert_pem=tmp_path / "repo.pem",
        )
    finally:
        for r in runners:
            await r.cleanup()


async def _proxy(repo: Repo, **kwargs: float) -> EgressProxy:
    proxy = EgressProxy(EgressConfig((repo.http_origin, repo.https_origin), port=0, **kwargs))  # type: ignore[arg-type]
    await proxy.start()
    return proxy


@pytest.mark.real_clock
async def test_allowed_origins_work_through_the_proxy(repo: Repo) -> None:
    proxy = await _proxy(repo)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{repo.http_origin}/meta.json?x=1", proxy=proxy.url) as resp:
                assert resp.status == 200
                body = await resp.json()
                assert body["path"] == "/meta.json?x=1"
                assert body["host"] == repo.http_origin.removeprefix("http://")
            async with http.post(f"{repo.http_origin}/report", data=b"r" * 100_000, proxy=proxy.url) as resp:
                assert (await resp.json())["received"] == 100_000
            async with http.get(f"{repo.https_origin}/meta.json", proxy=proxy.url, ssl=repo.trust) as resp:
                assert resp.status == 200
                assert (await resp.json())["version"] == 3

            # chunked request bodies pass through untouched
            async def gen() -> AsyncIterator[bytes]:
                for _ in range(5):
                    yield b"c" * 1000

            async with http.post(f"{repo.http_origin}/report", data=gen(), proxy=proxy.url) as resp:
                assert (await resp.json())["received"] == 5000
    finally:
        await proxy.stop()


@pytest.mark.real_clock
async def test_sm_fetcher_library_urllib3_works_through_the_proxy(repo: Repo) -> None:
    proxy = await _proxy(repo)
    try:

        def fetch() -> tuple[int, int]:
            pm = urllib3.ProxyManager(proxy.url, ca_certs=str(repo.cert_pem), retries=False)
            plain = pm.request("GET", f"{repo.http_origin}/meta.json")
            tls = pm.request("GET", f"{repo.https_origin}/meta.json")
            return plain.status, tls.status

        assert await asyncio.to_thread(fetch) == (200, 200)
    finally:
        await proxy.stop()


async def test_other_origins_are_refused(repo: Repo, caplog: pytest.LogCaptureFixture) -> None:
    proxy = await _proxy(repo)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{repo.other_origin}/meta.json", proxy=proxy.url) as resp:
                assert resp.status == 403
                assert "not an allowed repository origin" in await resp.text()
            other_tls = repo.other_origin.replace("http://", "https://")
            with pytest.raises(aiohttp.ClientHttpProxyError) as info:
                await http.get(f"{other_tls}/meta.json", proxy=proxy.url, ssl=repo.trust)
            assert info.value.status == 403
            # the https origin is allowed for CONNECT only, the http one for plain requests only
            with pytest.raises(aiohttp.ClientHttpProxyError):
                await http.get(repo.http_origin.replace("http://", "https://") + "/x", proxy=proxy.url)
        # not a proxy request at all
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(_head("GET /meta.json HTTP/1.1", "Host: x"))
        assert (await reader.read()).startswith(b"HTTP/1.1 400")
        writer.close()
        assert any("egress refused" in r.getMessage() for r in caplog.records)
    finally:
        await proxy.stop()


async def test_with_the_proxy_stopped_nothing_gets_out(repo: Repo) -> None:
    proxy = await _proxy(repo)
    url = proxy.url
    await proxy.stop()
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"{repo.http_origin}/meta.json", proxy=url)
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"{repo.https_origin}/meta.json", proxy=url, ssl=repo.trust)


async def test_stopping_the_proxy_cuts_open_tunnels(repo: Repo) -> None:
    proxy = await _proxy(repo)
    async with aiohttp.ClientSession() as http:
        resp = await http.get(f"{repo.http_origin}/slow", proxy=proxy.url)
        assert await resp.content.readexactly(5) == b"first"
        await proxy.stop()
        with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.IncompleteReadError)):
            async with asyncio.timeout(10):
                await resp.read()
        resp.release()


async def test_slow_head_idle_tunnel_and_too_many_connections(repo: Repo) -> None:
    proxy = EgressProxy(
        EgressConfig((repo.http_origin,), port=0, head_timeout=0.3, idle_timeout=0.3, max_connections=2)
    )
    await proxy.start()
    try:
        # a head that never ends: 408, closed
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET http://x/ HTTP/1.1\r\nX: ")
        async with asyncio.timeout(10):
            assert (await reader.read()).startswith(b"HTTP/1.1 408")
        writer.close()
        # an exchange where nothing moves: closed after idle_timeout
        async with aiohttp.ClientSession() as http:
            resp = await http.get(f"{repo.http_origin}/slow", proxy=proxy.url)
            with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
                async with asyncio.timeout(10):
                    await resp.read()
            resp.release()
        # a head larger than the limit: 431
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET http://x/ HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n")
        async with asyncio.timeout(10):
            assert (await reader.read()).startswith(b"HTTP/1.1 431")
        writer.close()
        # beyond max_connections: 503
        held = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(2)]
        await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        async with asyncio.timeout(10):
            assert (await reader.read()).startswith(b"HTTP/1.1 503")
        writer.close()
        for _r, w in held:
            w.close()
    finally:
        await proxy.stop()


async def test_unreachable_origin_is_502(repo: Repo) -> None:
    from iotdlm.bus.server import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    proxy = EgressProxy(EgressConfig((dead,), port=0))
    await proxy.start()
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{dead}/x", proxy=proxy.url) as resp:
            assert resp.status == 502
    finally:
        await proxy.stop()


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="origin"):
        EgressProxy(EgressConfig(("ftp://x",)))
    with pytest.raises(ValueError, match="positive"):
        EgressConfig(("http://x",), head_timeout=0)
    with pytest.raises(RuntimeError, match="not started"):
        _ = EgressProxy(EgressConfig(("http://x",))).port
