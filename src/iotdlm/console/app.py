"""The console's web application: aiohttp with Jinja2 templates, server-rendered, no JavaScript.

Every request is checked first (:func:`_guard`): the browser's TLS client certificate must be the
deployment's admin certificate, not revoked; a form (POST) must carry the page's CSRF token and, if
the browser says where it comes from (``Origin``), come from the console itself -- a browser holding
the admin certificate would otherwise let any web page it visits post a revocation. Errors become a
page in words (what failed, what to do), never a traceback.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web
from cryptography import x509

from iotdlm.clock import Clock
from iotdlm.console.backend import Backend
from iotdlm.console.tls import NotAdminError, check_admin, fingerprint
from iotdlm.errors import IotdlmError, NotFoundError, RejectedError, UnavailableError

log = logging.getLogger(__name__)

#: how the console finds the certificate the browser presented (DER), or None
PeerCertificate = Callable[[web.Request], bytes | None]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # not no-referrer: chromium then sends "Origin: null" with our forms
    "Cache-Control": "no-store",
}


def tls_peer_certificate(request: web.Request) -> bytes | None:
    """The client certificate of the request's TLS connection (DER), or None."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return der if isinstance(der, bytes) else None


@dataclass(frozen=True)
class Console:
    """What every handler needs, kept on the application."""

    backend: Backend
    admin: x509.Certificate
    clock: Clock
    peer: PeerCertificate
    csrf_key: bytes

    @property
    def csrf_token(self) -> str:
        return hmac.new(self.csrf_key, b"console-form", hashlib.sha256).hexdigest()


CONSOLE: web.AppKey[Console] = web.AppKey("console", Console)


def console_of(request: web.Request) -> Console:
    return request.app[CONSOLE]


def render(request: web.Request, template: str, context: dict[str, Any], *, status: int = 200) -> web.Response:
    """``template`` with the console's common context (CSRF token, the current page)."""
    ctx = {"csrf": console_of(request).csrf_token, "path": request.path, **context}
    return aiohttp_jinja2.render_template(template, request, ctx, status=status)


def _error_page(request: web.Request, status: int, title: str, message: str, hint: str | None) -> web.Response:
    return render(request, "error.html", {"title": title, "message": message, "hint": hint}, status=status)


async def _check_form(request: web.Request, con: Console) -> None:
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise NotAdminError(f"a form sent from another site ({origin[:100]}) was refused")
    form = await request.post()
    token = form.get("csrf")
    if not isinstance(token, str) or not hmac.compare_digest(token, con.csrf_token):
        raise NotAdminError("the form's check token is missing or stale: open the page again and resend it")


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    con = console_of(request)
    try:
        if request.path.startswith("/static/"):
            return await handler(request)
        peer = con.peer(request)
        check_admin(peer, con.admin, con.clock.now())
        assert peer is not None
        if await con.backend.admin_revoked(fingerprint(peer)):
            raise NotAdminError("the admin certificate is revoked: issue a new admin identity")
        if request.method == "POST":
            await _check_form(request, con)
        response = await handler(request)
    except NotAdminError as exc:
        response = render(request, "refused.html", {"message": exc.message}, status=403)
    except NotFoundError as exc:
        response = _error_page(request, 404, "Not found", exc.message, None)
    except RejectedError as exc:
        response = _error_page(request, 400, "Refused", f"{exc.message} ({exc.code})", None)
    except UnavailableError as exc:
        response = _error_page(
            request,
            503,
            "Not available now",
            exc.message,
            "Is the deployment up, and does the current mode run the module this needs? "
            "km runs in the certificate modes only; see the Mode page.",
        )
    except IotdlmError as exc:
        response = _error_page(request, 500, "Failed", f"{exc.message} ({exc.code})", None)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # the redirect after a form
        response = _error_page(
            request, exc.status, exc.reason, f"{request.method} {request.path[:200]}: {exc.reason}", None
        )
    except Exception:
        log.exception("console: %s %s failed", request.method, request.path)
        response = _error_page(
            request, 500, "Failed", "something unexpected failed",
            "The console's log (DIR/logs/console.log) says what; tell whoever runs iotdlm.",
        )  # fmt: skip
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def make_app(
    backend: Backend, admin: x509.Certificate, clock: Clock, *, peer: PeerCertificate = tls_peer_certificate
) -> web.Application:
    """The console application (routes in :mod:`iotdlm.console.views`)."""
    from iotdlm.console import views

    app = web.Application(middlewares=[_guard], client_max_size=64 * 1024)
    app[CONSOLE] = Console(backend, admin, clock, peer, secrets.token_bytes(32))
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("iotdlm.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    views.add_routes(app)
    return app
