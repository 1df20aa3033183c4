"""One ``/metrics`` for the whole deployment, on a loopback port (ADR 0018).

The supervisor knows each service process it started and its pid; at every scrape it asks each
one for its exposition on ``iotdlm.v1.<module>.metrics.<pid>`` over the bus (concurrently, a
short timeout each), adds its own view (``iotdlm_service_up``, ``iotdlm_service_restarts``,
``iotdlm_scrape_ok`` per process) and merges them (:func:`merge_expositions`). No module opens a
port; the listener accepts loopback addresses only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from iotdlm.bus import Bus
from iotdlm.bus import subjects as s
from iotdlm.errors import BadRequestError, IotdlmError
from iotdlm.observe.metrics import CONTENT_TYPE, instance_name, merge_expositions

log = logging.getLogger(__name__)

#: seconds to wait for each process's exposition
SCRAPE_TIMEOUT = 2.0


@dataclass(frozen=True)
class Target:
    """One supervised service: its name (km, pm-<dtype>), module, pid (None: not running), restarts."""

    name: str
    module: str
    pid: int | None
    restarts: int = 0


def check_loopback(host: str) -> None:
    """Refuse a listen address that is not loopback: metrics stay on the machine."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise BadRequestError(f"the metrics listener must use a loopback address, not {host!r}", field="metrics_host")


class Gatherer:
    """Asks every running target for its metrics and merges them with the supervisor's view."""

    def __init__(self, bus: Bus, targets: Callable[[], Sequence[Target]], *, timeout: float = SCRAPE_TIMEOUT) -> None:
        self.bus = bus
        self.targets = targets
        self.timeout = timeout

    async def _one(self, t: Target) -> bytes | None:
        assert t.pid is not None
        try:
            return await self.bus.request(f"{s.metrics_subject(t.module)}.{t.pid}", b"", timeout=self.timeout)
        except IotdlmError as exc:
            log.info("metrics of %s (pid %d): %s", t.name, t.pid, exc)
            return None

    async def gather(self) -> bytes:
        targets = list(self.targets())
        running = [t for t in targets if t.pid is not None]
        parts = await asyncio.gather(*(self._one(t) for t in running))
        own = CollectorRegistry(auto_describe=False)
        up = Gauge(
            "iotdlm_service_up", "1 when the supervisor runs the service, 0 when not.", ["service"], registry=own
        )
        restarts = Gauge(
            "iotdlm_service_restarts", "Restarts of the service by the supervisor.", ["service"], registry=own
        )
        ok = Gauge(
            "iotdlm_scrape_ok",
            "1 when the process answered with its metrics, else 0.",
            ["module", "instance"],
            registry=own,
        )
        for t in targets:
            up.labels(t.name).set(1 if t.pid is not None else 0)
            restarts.labels(t.name).set(t.restarts)
        answered = []
        for t, part in zip(running, parts, strict=True):
            assert t.pid is not None
            ok.labels(t.module, instance_name(t.module, t.pid)).set(1 if part is not None else 0)
            if part is not None:
                answered.append(part)
        texts = [generate_latest(own), *answered]
        try:
            return merge_expositions(texts)
        except BadRequestError as exc:  # one process sent nonsense: serve the others
            log.error("metrics: %s; serving the supervisor's own view only", exc.message)
            return texts[0]


class MetricsListener:
    """``GET /metrics`` on ``host:port`` (loopback only); ``port`` 0 picks a free one."""

    def __init__(self, gatherer: Gatherer, *, host: str = "127.0.0.1", port: int) -> None:
        check_loopback(host)
        self.gatherer = gatherer
        self.host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def port(self) -> int:
        if self._site is None or self._site._server is None:
            raise RuntimeError("the metrics listener is not started")
        sockets = getattr(self._site._server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else self._port

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await self.gatherer.gather()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self._port)
        try:
            await self._site.start()
        except OSError:
            await self.stop()
            raise

    async def stop(self) -> None:
        runner, self._runner, self._site = self._runner, None, None
        if runner is not None:
            await runner.cleanup()


async def start_listener(
    bus: Bus, targets: Callable[[], Sequence[Target]], *, port: int, host: str = "127.0.0.1"
) -> MetricsListener | None:
    """The started listener, or ``None`` when ``port`` is 0 (off) or taken: metrics are an aid, so
    a port in use is logged, naming the port and the setting, and the deployment runs on."""
    if port == 0:
        return None
    listener = MetricsListener(Gatherer(bus, targets), host=host, port=port)
    try:
        await listener.start()
    except OSError as exc:
        log.error(
            "metrics: cannot listen on %s:%d (%s: is the port in use?); /metrics is off. "
            "Choose another with metrics_port in iotdlm.toml (0 turns it off)",
            host,
            port,
            exc.strerror or exc,
        )
        return None
    log.info("metrics: Prometheus can scrape http://%s:%d/metrics", host, listener.port)
    return listener
