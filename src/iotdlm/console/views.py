"""The console's pages: one handler per page, each decode -> ask the backend -> render.

Actions are two steps, as an operator at 3 a.m. needs them: a GET shows exactly what will happen
and asks for a confirmation; the confirmed form is a POST, answered by a redirect to the page that
shows the result (so a reload never repeats it).
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlencode

from aiohttp import web
from cryptography.x509.oid import NameOID

from iotdlm.cli.revoke import REVOCATION_REASONS, check_reason
from iotdlm.console import pages_ops
from iotdlm.console.app import console_of, render
from iotdlm.errors import BadRequestError, NotFoundError, UnavailableError
from iotdlm.modes.table import Mode, modules_on, parse_mode

PAGE = 50
STATIC = Path(__file__).parent / "static"


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", home)
    app.router.add_get("/fleet", fleet)
    app.router.add_get("/devices/{device_id}", device)
    app.router.add_get("/devices/{device_id}/revoke", revoke_confirm)
    app.router.add_post("/devices/{device_id}/revoke", revoke_do)
    app.router.add_get("/mode", mode)
    app.router.add_get("/mode/switch", mode_confirm)
    app.router.add_post("/mode/switch", mode_do)
    app.router.add_get("/audit", audit)
    app.router.add_get("/audit/verify", audit_verify)
    app.router.add_get("/cas", cas)
    app.router.add_get("/health", health)
    app.router.add_static("/static", STATIC)
    pages_ops.add_routes(app)


def _redirect(location: str) -> web.Response:
    raise web.HTTPSeeOther(location)


async def home(_request: web.Request) -> web.Response:
    return _redirect("/fleet")


def _page_number(request: web.Request) -> int:
    raw = request.query.get("page", "1")
    if not raw.isdigit() or not 1 <= int(raw) <= 100_000:
        raise BadRequestError("page must be a whole number from 1", field="page")
    return int(raw)


def _choice(value: str | None, allowed: tuple[str, ...], what: str) -> str | None:
    if not value:
        return None
    if value not in allowed:
        raise BadRequestError(f"{what} must be one of: {', '.join(allowed)}", field=what)
    return value


PROFILES = ("factory", "operational", "service", "ocsp", "tls-server")
STATUSES = ("valid", "revoked", "superseded")


async def fleet(request: web.Request) -> web.Response:
    """Certificates of the fleet; search by device id or serial (any common spelling), filter by
    profile and status."""
    query = request.query.get("q", "")[:200]
    profile = _choice(request.query.get("profile"), PROFILES, "profile")
    status = _choice(request.query.get("status"), STATUSES, "status")
    page = _page_number(request)
    result = await console_of(request).backend.fleet(query, profile, status, PAGE, (page - 1) * PAGE)
    more = {"q": query, "profile": profile or "", "status": status or "", "page": page + 1}
    return render(
        request,
        "fleet.html",
        {
            "result": result, "query": query, "profile": profile, "status": status, "page": page,
            "profiles": PROFILES, "statuses": STATUSES, "now": console_of(request).clock.now(),
            "next": f"/fleet?{urlencode(more)}" if page * PAGE < result.total else None,
        },
    )  # fmt: skip


async def device(request: web.Request) -> web.Response:
    """One device: its record, certificates with what km's VA says of each, its audit trail."""
    con = console_of(request)
    device_id = request.match_info["device_id"]
    view = await con.backend.device(device_id)
    if view.device is None and not view.certificates:
        raise NotFoundError(f"no device {device_id!r} and no certificate names it: search the fleet for it")
    ocsp: dict[int, str] = {}
    ocsp_note = None
    for cert in view.certificates:
        if cert.status == "superseded" or ocsp_note is not None:
            continue
        try:
            ocsp[cert.serial] = await con.backend.ocsp_status(cert)
        except UnavailableError as exc:
            ocsp_note = f"km's OCSP responder did not answer ({exc.message}); km runs in the certificate modes only"
    return render(
        request,
        "device.html",
        {
            "device_id": device_id, "view": view, "ocsp": ocsp, "ocsp_note": ocsp_note,
            "reasons": REVOCATION_REASONS, "done": request.query.get("done"), "now": con.clock.now(),
        },
    )  # fmt: skip


def _revocation(request: web.Request, source: dict[str, str]) -> tuple[str, str | None, bool]:
    device_id = request.match_info["device_id"]
    action = source.get("action", "revoke")
    if action not in ("revoke", "decommission"):
        raise BadRequestError("action must be revoke or decommission", field="action")
    reason = source.get("reason") or None
    check_reason(reason)
    return device_id, reason, action == "decommission"


async def revoke_confirm(request: web.Request) -> web.Response:
    device_id, reason, decommission = _revocation(request, dict(request.query))
    view = await console_of(request).backend.device(device_id)
    valid = [c for c in view.certificates if c.status == "valid"]
    return render(
        request,
        "revoke_confirm.html",
        {"device_id": device_id, "reason": reason, "decommission": decommission, "valid": valid},
    )


async def revoke_do(request: web.Request) -> web.Response:
    form = await request.post()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    device_id, reason, decommission = _revocation(request, fields)
    if fields.get("confirm") != "yes":
        raise BadRequestError("tick the confirmation box to revoke", field="confirm")
    backend = console_of(request).backend
    view = await backend.device(device_id)
    if view.device is not None or decommission:
        revoked = await backend.revoke(device_id, reason, decommission=decommission)
    else:  # certificates issued outside provisioning (`ca issue`): km has no device record to revoke by
        revoked = []
        for cert in (c for c in view.certificates if c.status == "valid"):
            revoked += await backend.revoke_certificate(cert, reason)
    what = "decommissioned" if decommission else "revoked"
    done = f"{len(revoked)} certificate(s) {what} by km (signed as admin, audited)"
    return _redirect(f"/devices/{device_id}?{urlencode({'done': done})}")


def operator_name(request: web.Request) -> str:
    """Who switches, as the audit log names them: the admin certificate's name, from the console."""
    names = console_of(request).admin.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else "admin"
    return f"console:{cn}@{socket.gethostname()}"


async def mode(request: web.Request) -> web.Response:
    status = await console_of(request).backend.mode_status()
    return render(
        request, "mode.html", {"status": status, "modes": [m.value for m in Mode], "done": request.query.get("done")}
    )


async def mode_confirm(request: web.Request) -> web.Response:
    target = parse_mode(request.query.get("to", ""))
    status = await console_of(request).backend.mode_status()
    return render(
        request,
        "mode_confirm.html",
        {"status": status, "target": target.value, "modules": modules_on(target, with_sm=status.with_sm)},
    )


async def mode_do(request: web.Request) -> web.Response:
    form = await request.post()
    target = parse_mode(str(form.get("to", "")))
    if form.get("confirm") != "yes":
        raise BadRequestError("tick the confirmation box to switch the mode", field="confirm")
    reply = await console_of(request).backend.switch_mode(target.value, operator_name(request))
    if reply.changed:
        started, stopped = ", ".join(reply.started) or "none", ", ".join(reply.stopped) or "none"
        done = f"switched {reply.from_mode or 'off'} -> {reply.to}: started {started}, stopped {stopped}"
    else:
        done = f"already in {reply.to}; nothing changed"
    return _redirect(f"/mode?{urlencode({'done': done})}")


async def audit(request: web.Request) -> web.Response:
    page = _page_number(request)
    records, total = await console_of(request).backend.audit_page(PAGE, (page - 1) * PAGE)
    return render(
        request,
        "audit.html",
        {"records": records, "total": total, "page": page, "next": page + 1 if page * PAGE < total else None},
    )


async def audit_verify(request: web.Request) -> web.Response:
    view = await console_of(request).backend.audit_verify()
    return render(request, "verify.html", {"view": view})


async def cas(request: web.Request) -> web.Response:
    return render(
        request, "cas.html", {"cas": await console_of(request).backend.cas(), "now": console_of(request).clock.now()}
    )


async def health(request: web.Request) -> web.Response:
    backend = console_of(request).backend
    status = await backend.mode_status()
    try:
        metrics = await backend.metrics()
    except UnavailableError as exc:
        metrics = exc.message
    lines = [ln for ln in metrics.splitlines() if ln and not ln.startswith("#")]
    return render(request, "health.html", {"status": status, "metrics": lines[:400]})
