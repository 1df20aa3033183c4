"""The console process (``iotdlm console serve``, started by the supervisor in every mode): HTTPS
on ``[console] host:port`` (loopback by default), the admin identity on the bus, the store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket

from aiohttp import web

from iotdlm.client.connect import connect_identity, km_trust, sealer_for
from iotdlm.client.km import KmClient
from iotdlm.clock import Clock
from iotdlm.connections import open_store
from iotdlm.console.app import make_app
from iotdlm.console.backend import LiveBackend
from iotdlm.console.tls import issue_server_pair, server_context, server_pair_ok
from iotdlm.deployment import Deployment
from iotdlm.errors import UnavailableError

log = logging.getLogger(__name__)


def url_of(dep: Deployment) -> str:
    """Where the console answers (``https://127.0.0.1:8444/`` by default)."""
    return dep.config.console.url


def bind(dep: Deployment) -> socket.socket:
    """The console's listening socket, taken first: a port another program holds (another deployment's
    console, most often) is a clear error at once, before anything else starts."""
    host, port = dep.config.console.host, dep.config.console.port
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise UnavailableError(
            f"the console cannot listen on {host}:{port} ({exc.strerror}): another program (another "
            f"deployment's console?) holds it. Set another port in {dep.root / 'iotdlm.toml'}'s [console] table",
            field="console.port",
        ) from None


async def serve(dep: Deployment, clock: Clock, *, stop: asyncio.Event | None = None) -> None:
    """Serve the console until SIGTERM / SIGINT (or ``stop``)."""
    sock = bind(dep)
    try:
        await _serve_on(sock, dep, clock, stop)
    finally:
        sock.close()


async def _serve_on(sock: socket.socket, dep: Deployment, clock: Clock, stop: asyncio.Event | None) -> None:
    if not server_pair_ok(dep.root, clock.now()):
        cert = await asyncio.to_thread(issue_server_pair, dep, clock.now())
        log.info("console: issued its HTTPS certificate (serial %x) from the service CA", cert.serial_number)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    bus, ident = await connect_identity(dep, "admin")
    store = await asyncio.to_thread(open_store, dep)
    runner: web.AppRunner | None = None
    try:
        km = KmClient(bus, sealer_for(ident), clock, trust=km_trust(dep))
        app = make_app(LiveBackend(dep, store, bus, km, clock), ident.certificate, clock)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock, ssl_context=server_context(dep)).start()
        print(f"console: serving {url_of(dep)} (only the admin client certificate logs in)", flush=True)
        await stop.wait()
    finally:
        if runner is not None:
            await runner.cleanup()
        await bus.close()
        store.close()
