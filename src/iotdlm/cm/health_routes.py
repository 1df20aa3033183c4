"""cm's ``GET /health`` (liveness) and ``GET /ready`` (readiness), and the HTTP request counter.

Both answer JSON on cm's listeners without a client certificate and hold no secret. ``/health``
says the process answers; ``/ready`` says whether cm can do its work now: connected to NATS, the
mode in force runs cm (Table 1), and km answers when the mode runs km (503 with the reason when
not). The counter middleware counts every request by route pattern and status
(``iotdlm_http_requests_total``): the route is the pattern (``/crl/{issuer}/{name}``), never the
path a client sent, so a scan cannot grow the label set (docs/adr/0018).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from iotdlm import __version__

if TYPE_CHECKING:
    from iotdlm.cm.server import CmApp

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_JSON = {"Content-Type": "application/json", "Cache-Control": "no-store"}
_STARTED = time.monotonic()


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def middlewares(cm: CmApp) -> list[Middleware]:
    """The counting middleware (outermost, so it sees the status the error middleware chose). The
    counter of each (route, status) is looked up once and kept (prometheus' ``labels()`` costs more
    than the request's own work on the OCSP path); the routes and statuses are fixed sets."""
    children: dict[tuple[object, str, int], Any] = {}

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            metrics = cm.metrics
            if metrics is not None:
                route = _route(request)
                key = (metrics, route, status)  # a new ModuleMetrics (tests) gets counters of its own
                child = children.get(key)
                if child is None:
                    child = children[key] = metrics.http.labels(route, str(status))
                child.inc()

    return [count]


def add(app: web.Application, cm: CmApp) -> None:
    async def health(request: web.Request) -> web.Response:
        body = {"status": "ok", "module": "cm", "version": __version__}
        body["uptime_seconds"] = round(time.monotonic() - _STARTED, 3)  # type: ignore[assignment]
        return web.Response(body=json.dumps(body).encode(), headers=_JSON)

    async def ready(request: web.Request) -> web.Response:
        if cm.observer is None:  # no bus (unit harness): nothing to check
            body: dict[str, object] = {"ready": True, "reason": "", "mode": None}
        else:
            h = await cm.observer.health()
            body = {"ready": h.ready, "reason": h.reason, "mode": h.mode, "version": h.version}
        return web.Response(status=200 if body["ready"] else 503, body=json.dumps(body).encode(), headers=_JSON)

    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
