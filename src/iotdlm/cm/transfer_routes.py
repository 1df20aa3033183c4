"""cm's device-facing trust-transfer routes (seed 003 VII-D; issue 13), on the HTTPS listener.

The device authenticates with its TLS client certificate (its operational or factory certificate,
or at SP2 the factory certificate SP1 shared); cm bounds and decodes the request and relays it,
with the certificate, to km (:mod:`iotdlm.km.transfer_device_handlers`), which decides.

At SP1 (the fallbackURI is ``{public_url}/transfer/fallback``):

- ``GET /transfer/message`` -> the device's per-device transfer message (``application/cwt``, the
  transfer id in ``Iotdlm-Transfer``); ``?device=ID`` may name the device, and must name itself;
- ``POST /transfer/fallback`` with JSON ``{"transfer": ID, "reason": TEXT}`` -> JSON status;
- ``POST /transfer/refusal`` with JSON ``{"reason": CODE, "detail": TEXT, "message": SHA-256 hex}``
  (``message`` optional) -> JSON status: the device refused a transfer message (replayed, expired,
  altered, wrong signer, ...: :data:`iotdlm.wire.transfer_device.REFUSAL_REASONS`); km audits it
  and SP1's ``transfer status`` shows it. At most :data:`REFUSALS_PER_WINDOW` reports per device
  certificate per :data:`REFUSAL_WINDOW` per cm process (then 429 with ``Retry-After``).

At SP2 (the raURI is ``{public_url}/transfer/attestation``):

- ``POST /transfer/attestation/challenge`` -> JSON ``{"transfer": ID, "nonce": BASE64}``;
- ``POST /transfer/attestation/evidence`` with the COSE_Sign1 evidence
  (``application/cose``) -> JSON ``{"device", "ok", "reason"}``; refused evidence is a 403;
- ``GET /transfer/update`` (the updateURI) -> the image SP2 published for the device's transfer
  (``application/octet-stream``; ``Iotdlm-Transfer``, ``Iotdlm-Update-Version``,
  ``Iotdlm-Update-Sha256``); ``POST /transfer/update/report`` with JSON
  ``{"transfer": ID, "version": TEXT}`` -> the device installed it (updated).

Refusals as in :mod:`iotdlm.cm.server`: 401 without a client certificate, 403 for a certificate or
request km refuses (audited by km), 404 when nothing waits for the device, 400/413/415 for
malformed requests.
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import hashlib
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from iotdlm.client.km import KmClient
from iotdlm.client.transfer_device import TransferDeviceClient
from iotdlm.clock import Clock
from iotdlm.cm.server import ENROLL_MODES, ClientCertificateRequiredError, peer_certificate
from iotdlm.errors import BadRequestError, RateLimitedError
from iotdlm.wire import transfer_device as w

if TYPE_CHECKING:
    from iotdlm.cm.server import CmApp

MESSAGE_PATH = "/transfer/message"
FALLBACK_PATH = "/transfer/fallback"
REFUSAL_PATH = "/transfer/refusal"
RA_PATH = "/transfer/attestation"
CWT = "application/cwt"
COSE = "application/cose"
JSON = "application/json"
TRANSFER_HEADER = "Iotdlm-Transfer"
VERSION_HEADER = "Iotdlm-Update-Version"
SHA256_HEADER = "Iotdlm-Update-Sha256"
UPDATE_PATH = "/transfer/update"
MAX_FALLBACK_BODY = 2048
MAX_EVIDENCE_BODY = 16 * 1024
MAX_REFUSAL_BODY = 1024
#: refusal reports one device certificate may send per window, per cm process
REFUSALS_PER_WINDOW = 5
REFUSAL_WINDOW = dt.timedelta(minutes=10)
_HEX = frozenset("0123456789abcdef")


def parse_fallback(body: bytes) -> tuple[str, str]:
    """(transfer id, reason) of a fallback report: JSON ``{"transfer": hex id, "reason": text}``."""
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequestError('the fallback report must be JSON: {"transfer": ID, "reason": TEXT}') from None
    if not isinstance(data, dict) or set(data) != {"transfer", "reason"}:
        raise BadRequestError('the fallback report must be exactly {"transfer": ID, "reason": TEXT}')
    tid, reason = data["transfer"], data["reason"]
    if not isinstance(tid, str) or not 0 < len(tid) <= w.MAX_TRANSFER_ID or set(tid) - set("0123456789abcdef"):
        raise BadRequestError("the transfer id must be the hex id of the transfer", field="transfer")
    if not isinstance(reason, str) or not reason.strip():
        raise BadRequestError("the fallback report must say why (reason)", field="reason")
    return tid, " ".join(reason.split())[: w.MAX_REASON]


def parse_refusal(body: bytes) -> tuple[str, str, str]:
    """(reason, detail, message hash) of a refusal report: JSON ``{"reason": one of
    REFUSAL_REASONS, "detail": text, "message": 64 hex}`` (``message`` may be left out)."""
    usage = '{"reason": CODE, "detail": TEXT, "message": SHA-256 HEX}'
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequestError(f"the refusal report must be JSON: {usage}") from None
    if not isinstance(data, dict) or not {"reason", "detail"} <= set(data) <= {"reason", "detail", "message"}:
        raise BadRequestError(f"the refusal report must be {usage} (message optional)")
    reason, detail, message = data["reason"], data["detail"], data.get("message", "")
    if not isinstance(reason, str) or reason not in w.REFUSAL_REASONS:
        raise BadRequestError(f"the refusal reason must be one of {', '.join(w.REFUSAL_REASONS)}", field="reason")
    if not isinstance(detail, str) or len(detail) > 4 * w.MAX_REFUSAL_DETAIL:
        raise BadRequestError(f"the refusal detail must be text of at most {w.MAX_REFUSAL_DETAIL} characters",
                              field="detail")  # fmt: skip
    if not isinstance(message, str) or (message and (len(message) != 64 or set(message) - _HEX)):
        raise BadRequestError("the refused message is named by its SHA-256 in lowercase hex", field="message")
    clean = "".join(c if c.isprintable() else " " for c in detail)
    return reason, " ".join(clean.split())[: w.MAX_REFUSAL_DETAIL], message


class RefusalLimiter:
    """At most ``limit`` reports per ``window`` per key (the SHA-256 of the device's certificate),
    remembering at most ``max_keys`` devices (the oldest forgotten first)."""

    def __init__(self, clock: Clock, *, limit: int = REFUSALS_PER_WINDOW, window: dt.timedelta = REFUSAL_WINDOW,
                 max_keys: int = 100_000) -> None:  # fmt: skip
        if limit < 1 or window <= dt.timedelta(0) or max_keys < 1:
            raise ValueError("a refusal limit needs limit >= 1, a positive window and max_keys >= 1")
        self.clock, self.limit, self.window, self.max_keys = clock, limit, window, max_keys
        self._seen: collections.OrderedDict[str, collections.deque[dt.datetime]] = collections.OrderedDict()

    def check(self, key: str) -> None:
        """Count one report of ``key``; RateLimitedError when it is over the limit (not counted)."""
        now = self.clock.now()
        times = self._seen.pop(key, None) or collections.deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        self._seen[key] = times
        if len(times) >= self.limit:
            raise RateLimitedError(
                f"this device reported {len(times)} refused transfer messages in the last "
                f"{int(self.window.total_seconds() // 60)} minutes; report again later"
            )
        times.append(now)
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)


def parse_update_report(body: bytes) -> tuple[str, str]:
    """(transfer id, version) of an update report: JSON ``{"transfer": hex id, "version": text}``."""
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequestError('the update report must be JSON: {"transfer": ID, "version": TEXT}') from None
    if not isinstance(data, dict) or set(data) != {"transfer", "version"}:
        raise BadRequestError('the update report must be exactly {"transfer": ID, "version": TEXT}')
    tid, version = data["transfer"], data["version"]
    if not isinstance(tid, str) or not 0 < len(tid) <= w.MAX_TRANSFER_ID or set(tid) - set("0123456789abcdef"):
        raise BadRequestError("the transfer id must be the hex id of the transfer", field="transfer")
    if not isinstance(version, str) or not version.strip() or len(version) > 64:
        raise BadRequestError("the update report must name the installed version (at most 64 characters)")
    return tid, " ".join(version.split())


def parse_device_query(query: dict[str, str] | Any) -> str:
    """The ``device`` a message request names (empty: the device's own); nothing else is taken."""
    extra = set(query) - {"device"}
    if extra:
        raise BadRequestError(f"unknown query parameter {sorted(extra)[0][:40]!r}: only device= is taken")
    device = str(query.get("device", ""))
    if len(device) > w.MAX_DEVICE_ID or any(ord(c) < 0x20 or ord(c) == 0x7F for c in device):
        raise BadRequestError("the device query parameter is not a device id", field="device")
    return device


class TransferRoutes:
    def __init__(self, cm: CmApp, km: TransferDeviceClient) -> None:
        self.cm = cm
        self.km = km
        self.refusal_limit = RefusalLimiter(cm.clock)

    def _client_certificate(self, request: web.Request, what: str) -> bytes:
        der = peer_certificate(request)
        if der is None:
            raise ClientCertificateRequiredError(
                f"{what} needs the device's TLS client certificate (its operational or factory certificate)"
            )
        self.cm._require(ENROLL_MODES, what)
        return der

    async def message(self, request: web.Request) -> web.Response:
        der = self._client_certificate(request, "fetching a transfer message")
        device = parse_device_query(request.query)
        out = await self.km.message(der, device)
        return web.Response(
            body=out.message,
            headers={"Content-Type": CWT, TRANSFER_HEADER: out.transfer, "Cache-Control": "no-store"},
        )

    async def fallback(self, request: web.Request) -> web.Response:
        der = self._client_certificate(request, "reporting a fallback")
        _require_type(request, JSON)
        tid, reason = parse_fallback(await self.cm._read_body(request, MAX_FALLBACK_BODY))
        out = await self.km.fallback(der, tid, reason)
        return web.json_response({"transfer": out.transfer, "device": out.device, "status": out.status})

    async def refusal(self, request: web.Request) -> web.Response:
        der = self._client_certificate(request, "reporting a refused transfer message")
        _require_type(request, JSON)
        reason, detail, message = parse_refusal(await self.cm._read_body(request, MAX_REFUSAL_BODY))
        self.refusal_limit.check(hashlib.sha256(der).hexdigest())
        out = await self.km.refusal(der, reason, detail, message)
        return web.json_response({"transfer": out.transfer, "device": out.device, "status": out.status})

    async def challenge(self, request: web.Request) -> web.Response:
        der = self._client_certificate(request, "asking for an attestation challenge")
        out = await self.km.challenge(der)
        return web.json_response(
            {"transfer": out.transfer, "nonce": base64.b64encode(out.nonce).decode()},
            headers={"Cache-Control": "no-store"},
        )

    async def evidence(self, request: web.Request) -> web.Response:
        der = self._client_certificate(request, "submitting attestation evidence")
        _require_type(request, COSE)
        body = await self.cm._read_body(request, MAX_EVIDENCE_BODY)
        if not body:
            raise BadRequestError("the attestation evidence is empty")
        out = await self.km.evidence(der, body)
        return web.json_response({"device": out.device, "ok": out.ok, "reason": out.reason})

    async def update(self, request: web.Request) -> web.Response:
        der = self._client_certificate(request, "fetching an update")
        if request.query:
            raise BadRequestError("GET /transfer/update takes no query: the device is the one of the certificate")
        out = await self.km.update(der)
        headers = {
            "Content-Type": "application/octet-stream",
            TRANSFER_HEADER: out.transfer,
            VERSION_HEADER: out.version,
            SHA256_HEADER: out.sha256,
            "Cache-Control": "no-store",
        }
        return web.Response(body=out.image, headers=headers)

    async def update_report(self, request: web.Request) -> web.Response:
        der = self._client_certificate(request, "reporting an update")
        _require_type(request, JSON)
        tid, version = parse_update_report(await self.cm._read_body(request, MAX_FALLBACK_BODY))
        out = await self.km.updated(der, tid, version)
        return web.json_response({"transfer": out.transfer, "device": out.device, "status": out.status})


def _require_type(request: web.Request, expected: str) -> None:
    from iotdlm.cm.est import require_media_type

    require_media_type(request.headers.get("Content-Type"), expected)


def add(app: web.Application, cm: CmApp) -> None:
    """Register the routes on cm's HTTPS application (when cm talks to a real km client)."""
    if not isinstance(cm.km, KmClient):
        return
    routes = TransferRoutes(cm, TransferDeviceClient.like(cm.km))
    app.router.add_get(MESSAGE_PATH, routes.message)
    app.router.add_post(FALLBACK_PATH, routes.fallback)
    app.router.add_post(REFUSAL_PATH, routes.refusal)
    app.router.add_post(f"{RA_PATH}/challenge", routes.challenge)
    app.router.add_post(f"{RA_PATH}/evidence", routes.evidence)
    app.router.add_get(UPDATE_PATH, routes.update)
    app.router.add_post(f"{UPDATE_PATH}/report", routes.update_report)


__all__ = [
    "FALLBACK_PATH",
    "MESSAGE_PATH",
    "RA_PATH",
    "REFUSAL_PATH",
    "UPDATE_PATH",
    "RefusalLimiter",
    "TransferRoutes",
    "add",
    "parse_device_query",
    "parse_fallback",
    "parse_refusal",
    "parse_update_report",
]
