"""cm's TLS: its HTTPS server context, and a site that does each TLS handshake itself, so that every
refused handshake is logged and answered with OpenSSL's alert, within a time limit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import tempfile
from asyncio import sslproto
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web
from cryptography import x509

from iotdlm.pki.chain import certs_to_pem, der

log = logging.getLogger(__name__)


def server_tls_context(
    *,
    certificate_chain: Sequence[x509.Certificate],
    key_pem: bytes,
    client_cas: Sequence[x509.Certificate],
) -> ssl.SSLContext:
    """cm's HTTPS context: its HTTPS certificate chain (:mod:`iotdlm.cm_https`) as the server chain;
    client certificates *optional* at the TLS layer and, when presented, verified against
    ``client_cas`` (the root, and the factory and operational CAs so a device may send its leaf
    alone). /cacerts, OCSP and CRLs work without a client certificate; enrollment refuses (401)."""
    if not certificate_chain:
        raise ValueError("the server needs its certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION  # no client-initiated TLS 1.2 renegotiation (a CPU sink)
    # ssl loads certificate chains and keys from files only: a private folder, gone at once
    with tempfile.TemporaryDirectory(prefix="iotdlm-cm-") as d:
        chain_path = Path(d) / "chain.pem"
        key_path = Path(d) / "key.pem"
        chain_path.write_bytes(certs_to_pem(certificate_chain))
        key_path.touch(mode=0o600)
        key_path.write_bytes(key_pem)
        ctx.load_cert_chain(str(chain_path), str(key_path))
    ctx.load_verify_locations(cadata=b"".join(der(c) for c in client_cas))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


class TlsSite(web.TCPSite):
    """A TCP site that does the TLS handshake itself (``loop.start_tls``) before handing the
    connection to aiohttp, so that every refused handshake is logged (an expired or foreign client
    certificate is refused by OpenSSL before any handler runs, and asyncio reports that only in
    debug mode) and every handshake must finish within ``handshake_timeout`` seconds (aiohttp's
    TCPSite leaves asyncio's 60 s)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        handshake_timeout: float,
        backlog: int = 512,
    ) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, backlog=backlog)
        self._handshake_timeout = handshake_timeout
        self._handshakes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self._ssl_context is None:
            await super().start()
            return
        await web.BaseSite.start(self)  # registers the site with its runner
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _TlsAccept(self), self._host, self._port, backlog=self._backlog)
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]
        else:  # pragma: no cover
            self._bound_port = self._port

    async def stop(self) -> None:
        for task in list(self._handshakes):
            task.cancel()
        await super().stop()

    async def _handshake(self, transport: asyncio.Transport) -> None:
        server = self._runner.server
        ctx = self._ssl_context
        assert server is not None
        assert ctx is not None
        peer = transport.get_extra_info("peername")
        who = str(peer[0]) if peer else "?"
        handler = server()
        try:
            tls = await _start_tls(transport, handler, ctx, handshake_timeout=self._handshake_timeout)
        except ssl.SSLError as exc:
            detail = getattr(exc, "verify_message", None) or exc.reason or str(exc)
            log.warning("refused a TLS handshake from %s: %s", who, detail)
            transport.close()  # not abort(): that would drop the alert still on its way out
            return
        except (TimeoutError, ConnectionError, OSError) as exc:
            log.warning("refused a TLS handshake from %s: %s", who, str(exc) or type(exc).__name__)
            transport.abort()
            return
        if tls is None:  # pragma: no cover - start_tls returns the TLS transport
            transport.abort()
            return
        handler.connection_made(tls)


class _AlertingSSLProtocol(sslproto.SSLProtocol):
    """asyncio's server-side TLS protocol, except that a refused handshake ends with OpenSSL's TLS
    alert on the wire (RFC 8446 6.2: "certificate expired", "unknown CA", ...) before the close.

    Python 3.11's SSLProtocol, on a failed handshake, force-closes the transport with the alert
    OpenSSL has written still in its outgoing memory BIO: the client sees an EOF and cannot tell
    why it was refused. Here the BIO is flushed first and the transport closed gracefully (what
    is buffered is sent before the FIN). Private asyncio API: tested against every supported
    Python by tests/integration/test_cm.py (openssl s_client and Python's ssl see the alert)."""

    _refused = False

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            self._refused = True
            with contextlib.suppress(Exception):
                self._process_outgoing()  # type: ignore[attr-defined]  # the alert, into the transport
        super()._on_handshake_complete(handshake_exc)

    def _fatal_error(self, exc: BaseException, message: str = "Fatal error on transport") -> None:
        transport = self._transport
        if self._refused and transport is not None:
            transport.close()  # TlsSite logs the refusal; close() sends the buffered alert first
            return
        super()._fatal_error(exc, message)


async def _start_tls(
    transport: asyncio.Transport, protocol: asyncio.Protocol, ctx: ssl.SSLContext, *, handshake_timeout: float
) -> asyncio.Transport:
    """``loop.start_tls(transport, protocol, ctx, server_side=True)`` with :class:`_AlertingSSLProtocol`
    (the same steps as asyncio's own start_tls)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    tls = _AlertingSSLProtocol(
        loop,
        protocol,
        ctx,
        waiter,
        server_side=True,
        ssl_handshake_timeout=handshake_timeout,  # type: ignore[arg-type]  # typeshed says int; asyncio takes float
        call_connection_made=False,
    )
    transport.pause_reading()  # nothing reaches the TLS protocol before connection_made
    transport.set_protocol(tls)
    made = loop.call_soon(tls.connection_made, transport)
    resume = loop.call_soon(transport.resume_reading)
    try:
        await waiter
    except BaseException:
        transport.close()
        made.cancel()
        resume.cancel()
        raise
    return tls._app_transport


class _TlsAccept(asyncio.Protocol):
    """The plain TCP side of a :class:`TlsSite` connection, until ``start_tls`` takes it over."""

    def __init__(self, site: TlsSite) -> None:
        self._site = site
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # nothing is read before start_tls installs its protocol
        task = asyncio.get_running_loop().create_task(self._site._handshake(transport))
        self._site._handshakes.add(task)
        task.add_done_callback(self._site._handshakes.discard)
        self._task = task

    def connection_lost(self, exc: Exception | None) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
