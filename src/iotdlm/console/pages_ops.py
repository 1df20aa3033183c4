"""The console's pages for the factory floor and the hand-over: provisioning runs (pm's records and
its alarm, cleared with a confirmation as ``iotdlm pm clear-alarm`` clears it), the software sm
holds (``sm.software.held``), and trust transfers (each transfer's devices per status, as ``iotdlm
transfer status`` counts them).

The provisioning and transfer pages are live without JavaScript: the browser reloads them every
:data:`REFRESH_SECONDS` (``<meta http-equiv="refresh">``), and they say when they were made."""

from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web

from iotdlm.console.app import console_of, render
from iotdlm.errors import BadRequestError
from iotdlm.transfer.status import STATUSES

#: how often the live pages reload themselves
REFRESH_SECONDS = 5


def add_routes(app: web.Application) -> None:
    app.router.add_get("/provisioning", provisioning)
    app.router.add_get("/provisioning/clear-alarm", clear_confirm)
    app.router.add_post("/provisioning/clear-alarm", clear_do)
    app.router.add_get("/transfers", transfers)
    app.router.add_get("/software", software)


async def provisioning(request: web.Request) -> web.Response:
    con = console_of(request)
    views = await con.backend.provisioning()
    return render(
        request,
        "provisioning.html",
        {"views": views, "done": request.query.get("done"), "now": con.clock.now(), "refresh": REFRESH_SECONDS},
    )


def _dtype(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > 64:
        raise BadRequestError("name the device type whose alarm to clear", field="dtype")
    return value


async def clear_confirm(request: web.Request) -> web.Response:
    dtype = _dtype(request.query.get("dtype"))
    view = next((v for v in await console_of(request).backend.provisioning() if v.dtype == dtype), None)
    if view is None or view.alarm is None or view.alarm.state != "raised":
        raise BadRequestError(f"pm-{dtype} has no alarm raised; nothing to clear", field="dtype")
    return render(request, "clear_alarm.html", {"view": view})


async def clear_do(request: web.Request) -> web.Response:
    from iotdlm.console.views import operator_name

    form = await request.post()
    dtype = _dtype(form.get("dtype"))
    if form.get("confirm") != "yes":
        raise BadRequestError("tick the confirmation box to clear the alarm", field="confirm")
    await console_of(request).backend.clear_alarm(dtype, operator_name(request))
    done = f"the alarm of pm-{dtype} was cleared (audited); pm provisions again"
    raise web.HTTPSeeOther(f"/provisioning?{urlencode({'done': done})}")


async def transfers(request: web.Request) -> web.Response:
    con = console_of(request)
    views = await con.backend.transfers()
    return render(
        request,
        "transfers.html",
        {"views": views, "statuses": STATUSES, "now": con.clock.now(), "refresh": REFRESH_SECONDS},
    )


async def software(request: web.Request) -> web.Response:
    """The releases sm holds, each verified again by sm (or why sm did not answer)."""
    return render(request, "software.html", {"view": await console_of(request).backend.software()})
