"""The transfer's device routes on cm's CoAP door (issue 17, ADR 0029), beside ``/transfer/tm``:
what :mod:`iotdlm.cm.transfer_routes` serves over HTTPS, for a constrained device, OSCORE-protected
from an EDHOC session whose key is the certificate's the request carries (payloads:
:mod:`iotdlm.wire.coap_transfer`). Relayed to km as over HTTPS -- the same parsers, limits, mode
check and refusal rate limit; km decides and audits:

- ``POST /transfer/fallback``, ``/transfer/refusal``: the reports (SP1);
- ``POST /transfer/attestation/challenge``, ``/evidence``: the raURI (SP2); a refused evidence is
  a verdict (``ok`` false), as over HTTPS;
- ``POST /transfer/update``: the image (block-wise, Block2), ``/transfer/update/report`` (SP2).

(``update`` is a POST, not GET: the request carries the device's certificate.)
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Set
from typing import Any

import aiocoap
import aiocoap.resource as resource

from iotdlm.client.transfer_device import TransferDeviceClient
from iotdlm.clock import Clock
from iotdlm.cm import transfer_routes as https
from iotdlm.cm.server import ENROLL_MODES
from iotdlm.errors import BadRequestError, NotAuthorizedError, UntrustedError
from iotdlm.wire import coap_transfer as wire

Require = Callable[[Set[str], str], None]


class CoapTransferRoutes:
    """The handlers; :meth:`add` puts them on the door's site."""

    def __init__(self, km: TransferDeviceClient, require: Require, clock: Clock) -> None:
        self.km = km
        self._require = require
        self.refusal_limit = https.RefusalLimiter(clock)

    def add(self, root: resource.Site, route: Callable[[Any], resource.Resource]) -> None:
        for path, handler in (
            (wire.FALLBACK, self.fallback),
            (wire.REFUSAL, self.refusal),
            (wire.CHALLENGE, self.challenge),
            (wire.EVIDENCE, self.evidence),
            (wire.UPDATE, self.update),
            (wire.UPDATE_REPORT, self.update_report),
        ):
            root.add_resource(list(path), route(handler))

    def _request(
        self, request: aiocoap.Message, what: str, max_body: int = https.MAX_FALLBACK_BODY
    ) -> wire.TransferRequest:
        from iotdlm.cm.coap import _bind, _peer, _require_format

        peer = _peer(request)
        self._require(ENROLL_MODES, what)
        _require_format(request, wire.CBOR)
        parsed = wire.decode_request(bytes(request.payload), max_body)
        _bind(peer, parsed.certificate)
        return parsed

    async def fallback(self, request: aiocoap.Message) -> aiocoap.Message:
        r = self._request(request, "reporting a fallback over CoAP")
        tid, reason = https.parse_fallback(r.body)
        out = await self.km.fallback(r.certificate, tid, reason)
        return _json({"transfer": out.transfer, "device": out.device, "status": out.status})

    async def refusal(self, request: aiocoap.Message) -> aiocoap.Message:
        r = self._request(request, "reporting a refused transfer message over CoAP", https.MAX_REFUSAL_BODY)
        reason, detail, message = https.parse_refusal(r.body)
        self.refusal_limit.check(hashlib.sha256(r.certificate).hexdigest())
        out = await self.km.refusal(r.certificate, reason, detail, message)
        return _json({"transfer": out.transfer, "device": out.device, "status": out.status})

    async def challenge(self, request: aiocoap.Message) -> aiocoap.Message:
        r = self._request(request, "asking for an attestation challenge over CoAP", 0)
        out = await self.km.challenge(r.certificate)
        return _json({"transfer": out.transfer, "nonce": base64.b64encode(out.nonce).decode()})

    async def evidence(self, request: aiocoap.Message) -> aiocoap.Message:
        r = self._request(request, "submitting attestation evidence over CoAP", https.MAX_EVIDENCE_BODY)
        if not r.body:
            raise BadRequestError("the attestation evidence is empty")
        try:
            out = await self.km.evidence(r.certificate, r.body)
        except (UntrustedError, NotAuthorizedError) as exc:  # a failed verdict, as the HTTPS client reads a 403
            return _json({"device": "?", "ok": False, "reason": exc.message})
        return _json({"device": out.device, "ok": out.ok, "reason": out.reason})

    async def update(self, request: aiocoap.Message) -> aiocoap.Message:
        r = self._request(request, "fetching an update over CoAP", 0)
        out = await self.km.update(r.certificate)
        payload = wire.encode_update(wire.UpdateAnswer(out.transfer, out.version, out.sha256, out.image))
        return aiocoap.Message(code=aiocoap.CONTENT, payload=payload, content_format=wire.CBOR)

    async def update_report(self, request: aiocoap.Message) -> aiocoap.Message:
        r = self._request(request, "reporting an update over CoAP")
        tid, version = https.parse_update_report(r.body)
        out = await self.km.updated(r.certificate, tid, version)
        return _json({"transfer": out.transfer, "device": out.device, "status": out.status})


def _json(data: dict[str, Any]) -> aiocoap.Message:
    return aiocoap.Message(code=aiocoap.CHANGED, payload=json.dumps(data).encode(), content_format=wire.JSON)


__all__ = ["CoapTransferRoutes"]
