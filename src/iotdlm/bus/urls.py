"""Which NATS URLs a module may use: plain NATS only to a loopback host (ADR 0007).

Plain ``nats://`` (or ``ws://``) carries every module's password and every request in clear; that
is acceptable only when the server is on this machine. Any other host needs ``tls://`` (or
``wss://``), unless the operator says the network is trusted (``[nats] allow_plain = true``).
Pure: no I/O, so the deployment loader and :func:`iotdlm.bus.nats.connect` both call it before
anything connects.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from iotdlm.errors import BadRequestError

PLAIN_SCHEMES = ("nats", "ws")
TLS_SCHEMES = ("tls", "wss")
#: what the refusal tells the operator to do
FIX = "use tls:// and [nats] tls = true, or set [nats] allow_plain = true if this network is trusted"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and ``localhost`` (nothing else is resolved: a name could point anywhere)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def nats_host(url: str) -> tuple[str, str]:
    """(scheme, host) of a NATS URL, with nats-py's default scheme (``nats``) when none is given."""
    if not isinstance(url, str) or not url.strip():
        raise BadRequestError("the NATS URL is empty", field="nats.url")
    normalized = url if "://" in url else f"nats://{url}"
    try:
        parts = urlsplit(normalized)
        host = parts.hostname
        _ = parts.port  # a bad port raises here
    except ValueError as exc:
        raise BadRequestError(f"the NATS URL {url!r} is not valid: {exc}", field="nats.url") from None
    scheme = parts.scheme.lower()
    if scheme not in PLAIN_SCHEMES + TLS_SCHEMES:
        raise BadRequestError(
            f"the NATS URL {url!r} has scheme {scheme!r}; use tls:// (or nats:// to a loopback address)",
            field="nats.url",
        )
    if not host:
        raise BadRequestError(f"the NATS URL {url!r} names no host", field="nats.url")
    return scheme, host


def check_nats_url(url: str, *, allow_plain: bool = False) -> bool:
    """Refuse a plain NATS URL to a host that is not loopback, unless ``allow_plain``.

    Returns True when the URL is plain to a non-loopback host and allowed by ``allow_plain`` (the
    caller logs a warning), False otherwise.
    """
    scheme, host = nats_host(url)
    if scheme in TLS_SCHEMES or is_loopback(host):
        return False
    if allow_plain:
        return True
    raise BadRequestError(
        f"plain NATS to {host} is refused: passwords and requests would cross the network in clear; {FIX}",
        field="nats.url",
    )
