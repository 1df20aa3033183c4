"""A constrained device's transfer steps over CoAP/EDHOC/OSCORE (issue 17, ADR 0029): the transfer
agent's attestation, update, fallback and refusal clients for ``coap://`` URIs, each step on an
OSCORE context from an EDHOC session with the credential the route takes (at SP1 the operational
certificate, else the factory one; at SP2 the factory certificate, the one SP1 shared), cm
authenticated by the EDHOC credential the device holds for that URI's origin. A URI that is not
``coap://`` goes to ``https`` (the device's HTTPS clients), when given."""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.parse
from collections.abc import Mapping
from typing import Any

from iotdlm.device.coap_client import coap_client_for
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.errors import BadRequestError, UntrustedError
from iotdlm.transfer import attestation
from iotdlm.transfer.shell import UpdateImage
from iotdlm.wire import coap_transfer as wire


class DeviceCoap:
    def __init__(
        self,
        dev: SimulatedDevice,
        credentials: Mapping[str, bytes],
        *,
        https: Any = None,
        timeout: float = 30.0,
        c509: bool = False,
    ) -> None:
        self.dev = dev
        self.credentials = {k.rstrip("/"): v for k, v in credentials.items()}
        self.https = https
        self.timeout = timeout
        self.c509 = c509

    async def _call(self, uri: str, kind: str, body: bytes, expect: int) -> bytes:
        parts = urllib.parse.urlsplit(uri)
        origin = f"coap://{parts.netloc}"
        cred = self.credentials.get(origin)
        if cred is None:
            raise UntrustedError(f"this device holds no EDHOC credential for {origin}: it cannot authenticate that cm")
        if kind == "sp1":
            kind = "operational" if self.dev.certificate("operational") is not None else "factory"
        cert_pem, key_pem = self.dev.tls_identity(kind)
        async with coap_client_for(origin, cred, cert_pem, key_pem, timeout=self.timeout, c509=self.c509) as c:
            return await c.transfer(uri, body, expect=expect)

    def _https(self, uri: str) -> Any:
        if uri.startswith("coap://"):
            return None
        if self.https is None:
            raise BadRequestError(f"{uri[:80]}: this device speaks CoAP only (coap://)")
        return self.https

    async def report(self, fallback_uri: str, *, transfer_id: str, device_id: str, reason: str) -> None:
        if (h := self._https(fallback_uri)) is not None:
            return await h.report(fallback_uri, transfer_id=transfer_id, device_id=device_id, reason=reason)  # type: ignore[no-any-return]
        body = json.dumps({"transfer": transfer_id, "reason": reason}).encode()
        await self._call(fallback_uri, "sp1", body, wire.JSON)
        return None

    async def report_refusal(self, cm_url: str, *, reason: str, detail: str, message: str) -> None:
        if (h := self._https(cm_url)) is not None:
            return await h.report_refusal(cm_url, reason=reason, detail=detail, message=message)  # type: ignore[no-any-return]
        body = json.dumps({"reason": reason, "detail": detail, "message": message}).encode()
        await self._call(cm_url.rstrip("/") + "/" + "/".join(wire.REFUSAL), "sp1", body, wire.JSON)
        return None

    async def challenge(self, ra_uri: str, device_id: str) -> bytes:
        if (h := self._https(ra_uri)) is not None:
            return await h.challenge(ra_uri, device_id)  # type: ignore[no-any-return]
        out = _json(await self._call(ra_uri.rstrip("/") + "/challenge", "factory", b"", wire.JSON), "the challenge")
        try:
            return base64.b64decode(str(out.get("nonce")), validate=True)
        except ValueError as exc:
            raise BadRequestError("the attestation challenge carries no base64 nonce") from exc

    async def submit(self, ra_uri: str, evidence: bytes) -> attestation.Verdict:
        if (h := self._https(ra_uri)) is not None:
            return await h.submit(ra_uri, evidence)  # type: ignore[no-any-return]
        v = _json(await self._call(ra_uri.rstrip("/") + "/evidence", "factory", evidence, wire.JSON), "the verdict")
        return attestation.Verdict(str(v.get("device", "?")), v.get("ok") is True, str(v.get("reason", "")))

    async def fetch(self, update_uri: str, device_id: str) -> UpdateImage:
        if (h := self._https(update_uri)) is not None:
            return await h.fetch(update_uri, device_id)  # type: ignore[no-any-return]
        out = wire.decode_update(await self._call(update_uri, "factory", b"", wire.CBOR))
        if hashlib.sha256(out.image).hexdigest() != out.sha256:
            raise BadRequestError("the update image does not match the SHA-256 the update server named")
        return UpdateImage(out.image, {"transfer": out.transfer, "version": out.version, "sha256": out.sha256})

    async def report_updated(self, update_uri: str, *, transfer_id: str, version: str) -> None:
        if (h := self._https(update_uri)) is not None:
            return await h.report_updated(update_uri, transfer_id=transfer_id, version=version)  # type: ignore[no-any-return]
        body = json.dumps({"transfer": transfer_id, "version": version}).encode()
        await self._call(update_uri.rstrip("/") + "/report", "factory", body, wire.JSON)
        return None


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        out = json.loads(data)
    except ValueError as exc:
        raise BadRequestError(f"{what} is not JSON") from exc
    if not isinstance(out, dict):
        raise BadRequestError(f"{what} is not a JSON object")
    return out


__all__ = ["DeviceCoap"]
