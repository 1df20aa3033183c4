"""A module process answers ``iotdlm.v1.<module>.health`` and ``.metrics`` on the bus.

Each subject is served twice: in the module's queue group (any one process answers: "is km
there?") and, outside it, with the process id appended (``iotdlm.v1.km.metrics.4242``), so the
supervisor can ask every process it started, one by one, without a port per worker (ADR 0018).

:class:`InstrumentedBus` wraps a module's :class:`~iotdlm.bus.Bus`: every request it serves is
timed (``iotdlm_request_seconds`` by operation), counted while in flight (the queue depth), and
its refusals counted by error code -- with no change to the service's own handlers.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Set
from typing import Protocol

from iotdlm import __version__
from iotdlm.bus import Bus, Message, Subscription
from iotdlm.bus import subjects as s
from iotdlm.bus.api import AppendOnlyStream, EventHandler, KeyValue, RequestHandler
from iotdlm.errors import IotdlmError, ModeError
from iotdlm.modes.table import MODULES, modes_where
from iotdlm.observe.metrics import ModuleMetrics
from iotdlm.wire import health as h

log = logging.getLogger(__name__)

#: says whether the process is ready, and why not ("" when it is)
ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]


class ModeReader(Protocol):
    """What readiness needs of :class:`iotdlm.modes.guard.ModeGuard`."""

    @property
    def mode(self) -> str | None: ...

    def require(self, allowed_modes: Set[str], what: str) -> str: ...


def operation(subject: str) -> str:
    """The ``operation`` label of a served subject: without the ``iotdlm.v1.`` prefix."""
    return subject.removeprefix(f"{s.PREFIX}.")


class InstrumentedBus:
    """``bus`` with every served request timed and counted in ``metrics`` (see module doc)."""

    def __init__(self, bus: Bus, metrics: ModuleMetrics) -> None:
        self._bus = bus
        self.metrics = metrics

    @property
    def module(self) -> str:
        return self._bus.module

    @property
    def is_connected(self) -> bool:
        return bool(getattr(self._bus, "is_connected", True))

    async def request(self, subject: str, data: bytes, *, timeout: float = 5.0) -> bytes:  # noqa: ASYNC109
        return await self._bus.request(subject, data, timeout=timeout)

    async def publish(self, subject: str, data: bytes) -> None:
        await self._bus.publish(subject, data)

    async def serve(self, subject: str, handler: RequestHandler, *, queue: str | None = None) -> Subscription:
        return await self._bus.serve(subject, self.timed(operation(subject), handler), queue=queue)

    async def subscribe(self, subject: str, handler: EventHandler, *, queue: str | None = None) -> Subscription:
        return await self._bus.subscribe(subject, handler, queue=queue)

    async def key_value(self, bucket: str, *, create: bool = False) -> KeyValue:
        return await self._bus.key_value(bucket, create=create)

    async def append_only_stream(self, name: str, subject: str, *, create: bool = False) -> AppendOnlyStream:
        return await self._bus.append_only_stream(name, subject, create=create)

    async def drain(self) -> None:
        await self._bus.drain()

    async def close(self) -> None:
        await self._bus.close()

    def timed(self, op: str, handler: RequestHandler) -> RequestHandler:
        m = self.metrics
        seconds = m.requests.labels(op)

        async def answer(msg: Message) -> bytes:
            start = time.perf_counter()
            m.in_flight.inc()
            try:
                return await handler(msg)
            except IotdlmError as exc:
                m.refused(exc.code)
                raise
            finally:
                m.in_flight.dec()
                seconds.observe(time.perf_counter() - start)

        return answer


async def _always_ready() -> tuple[bool, str]:
    return True, ""


class Observer:
    """Serves one process's health and metrics on the bus. ``ready`` is its readiness check
    (default: mode and bus, :func:`mode_ready`); ``mode`` tells the mode it reads."""

    def __init__(
        self,
        bus: Bus,
        metrics: ModuleMetrics,
        *,
        mode: ModeReader | None = None,
        ready: ReadyCheck | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus = bus
        self.metrics = metrics
        self.module = metrics.module
        self._mode = mode
        self._ready = ready or (mode_ready(bus, mode, self.module) if mode is not None else _always_ready)
        self._monotonic = monotonic
        self._started = monotonic()
        self._subs: list[Subscription] = []

    async def start(self) -> None:
        pid = int(self.metrics.instance.rsplit("-", 1)[1])
        queue = s.queue_group(self.module)
        for subject, handler in (
            (s.health_subject(self.module), self._health),
            (s.metrics_subject(self.module), self._metrics),
        ):
            self._subs.append(await self.bus.serve(subject, handler, queue=queue))
            self._subs.append(await self.bus.serve(f"{subject}.{pid}", handler))

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def health(self) -> h.Health:
        ready, reason = await self._ready()
        m = self.metrics
        mode = self._mode.mode if self._mode is not None else None
        m.set_mode(mode)
        m.ready.set(1 if ready else 0)
        count, total = _histogram_totals(m)
        return h.Health(
            module=self.module,
            instance=m.instance,
            pid=int(m.instance.rsplit("-", 1)[1]),
            ready=ready,
            reason=reason,
            mode=mode,
            version=__version__,
            uptime_seconds=round(self._monotonic() - self._started, 3),
            in_flight=int(_sum(m.in_flight, "")),
            mean_request_seconds=round(total / count, 6) if count else None,
            counters=counters(m),
        )

    async def _health(self, msg: Message) -> bytes:
        return h.encode(await self.health())

    async def _metrics(self, msg: Message) -> bytes:
        await self.health()  # refreshes the mode and ready gauges
        return self.metrics.exposition()


def _sum(metric: object, suffix: str = "_total") -> float:
    total = 0.0
    for family in metric.collect():  # type: ignore[attr-defined]
        for sample in family.samples:
            if sample.name.endswith(suffix):
                total += sample.value
    return total


def _histogram_totals(m: ModuleMetrics) -> tuple[float, float]:
    return _sum(m.requests, "_count"), _sum(m.requests, "_sum")


def counters(m: ModuleMetrics) -> dict[str, float]:
    """Totals of the key counters (what ``iotdlm status --watch`` shows)."""
    return {
        "issued": _sum(m.issued),
        "refused": _sum(m.refusals),
        "ocsp": _sum(m.ocsp),
        "crls": _sum(m.crls),
        "http": _sum(m.http),
        "requests": _histogram_totals(m)[0],
    }


def mode_ready(bus: Bus, mode: ModeReader, module: str) -> ReadyCheck:
    """Ready when the bus is connected and the mode in force runs ``module`` (Table 1)."""
    allowed = modes_where(module) if module in MODULES else frozenset()

    async def check() -> tuple[bool, str]:
        if not getattr(bus, "is_connected", True):
            return False, "not connected to NATS"
        if allowed:
            try:
                mode.require(allowed, "work")
            except ModeError as exc:
                return False, exc.message
        return True, ""

    return check


def km_answering(bus: Bus, base: ReadyCheck, mode: ModeReader, *, timeout: float = 0.5) -> ReadyCheck:
    """``base``, and km answers its health subject when the mode in force runs km (cm's /ready).
    ``timeout`` stays well under what askers of cm's own health wait (2 s for ``status --watch``),
    so a stopped km makes cm say "not ready" rather than not answer."""
    km_modes = modes_where("km")

    async def check() -> tuple[bool, str]:
        ready, reason = await base()
        if not ready or mode.mode not in km_modes:
            return ready, reason
        try:
            reply = h.decode(await bus.request(s.health_subject("km"), b"", timeout=timeout))
        except IotdlmError as exc:
            return False, f"km does not answer: {exc.message}"
        if not reply.ready:
            return False, f"km is not ready: {reply.reason}"
        return True, ""

    return check
