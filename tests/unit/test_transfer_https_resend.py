"""A device's transfer reports to a provider's cm when cm closes the keep-alive connection a
report goes out on (cm closes idle ones after Limits.idle_timeout): a report of a state (the
update installed, the fallback) is sent once more; a report that counts (a refusal) is not."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from iotdlm.clock import SystemClock
from iotdlm.cm.tls import server_tls_context
from iotdlm.errors import UnavailableError
from iotdlm.pki.keys import private_key_to_pem
from iotdlm.transfer.http_clients import TransferHttps
from tests.helpers import make_pki

REAL_NOW = SystemClock().now()
PKI = make_pki(now=REAL_NOW)  # real TLS checks validity against the real clock
SERVER = PKI.tls_server("cm", now=REAL_NOW)

pytestmark = pytest.mark.real_clock


@pytest.fixture
async def cut_once() -> AsyncIterator[tuple[str, list[str]]]:
    """A TLS server that closes the first request's connection unanswered, then answers 200."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        if len(seen) == 1:
            assert request.transport is not None
            request.transport.close()
        return web.json_response({})

    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    ctx = server_tls_context(
        certificate_chain=[SERVER.cert, PKI.cas["service"].certificate],
        key_pem=private_key_to_pem(SERVER.key, None),
        client_cas=[PKI.root],
    )
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    try:
        yield f"https://127.0.0.1:{site.port}", seen
    finally:
        await runner.cleanup()


def _client() -> TransferHttps:
    return TransferHttps(anchors=[PKI.root], client_cert_pem=None, client_key_pem=None, timeout=10.0)


async def test_the_update_report_is_sent_again(cut_once: tuple[str, list[str]]) -> None:
    url, seen = cut_once
    async with _client() as c:
        await c.report_updated(f"{url}/transfer/update", transfer_id="t", version="5.0")
    assert seen == ["/transfer/update/report", "/transfer/update/report"]


async def test_the_fallback_report_is_sent_again(cut_once: tuple[str, list[str]]) -> None:
    url, seen = cut_once
    async with _client() as c:
        await c.report(f"{url}/transfer/fallback", transfer_id="t", device_id="d", reason="r")
    assert seen == ["/transfer/fallback", "/transfer/fallback"]


async def test_a_refusal_report_is_not_sent_twice(cut_once: tuple[str, list[str]]) -> None:
    url, seen = cut_once
    async with _client() as c:
        with pytest.raises(UnavailableError, match="cannot reach"):
            await c.report_refusal(url, reason="altered", detail="d", message="m")
    assert seen == ["/transfer/refusal"]
