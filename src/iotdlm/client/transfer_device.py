"""cm's relay of the device-facing trust-transfer routes to km (issue 13): the requests signed as
cm, km's signed replies verified, as every other :class:`~iotdlm.client.km.KmClient` call."""

from __future__ import annotations

from iotdlm.bus import subjects as s
from iotdlm.client.km import KmClient
from iotdlm.wire import transfer_device as w


class TransferDeviceClient(KmClient):
    async def message(self, client_certificate: bytes, device: str = "") -> w.MessageResponse:
        token = self._seal(w.OP_MESSAGE, w.MessageRequest(client_certificate=client_certificate, device=device))
        reply = await self._call(s.KM_TRANSFER_MESSAGE, token, timeout=self.timeout)
        return w.decode(reply, w.MessageResponse, what="km reply")

    async def fallback(self, client_certificate: bytes, transfer: str, reason: str) -> w.Done:
        body = w.FallbackRequest(client_certificate=client_certificate, transfer=transfer, reason=reason)
        reply = await self._call(s.KM_TRANSFER_FALLBACK, self._seal(w.OP_FALLBACK, body), timeout=self.timeout)
        return w.decode(reply, w.Done, what="km reply")

    async def refusal(self, client_certificate: bytes, reason: str, detail: str, message: str = "") -> w.Done:
        body = w.RefusalRequest(client_certificate=client_certificate, reason=reason, detail=detail, message=message)
        reply = await self._call(s.KM_TRANSFER_REFUSAL, self._seal(w.OP_REFUSAL, body), timeout=self.timeout)
        return w.decode(reply, w.Done, what="km reply")

    async def challenge(self, client_certificate: bytes) -> w.ChallengeResponse:
        body = w.ChallengeRequest(client_certificate=client_certificate)
        reply = await self._call(s.KM_TRANSFER_CHALLENGE, self._seal(w.OP_CHALLENGE, body), timeout=self.timeout)
        return w.decode(reply, w.ChallengeResponse, what="km reply")

    async def evidence(self, client_certificate: bytes, evidence: bytes) -> w.Verdict:
        body = w.EvidenceRequest(client_certificate=client_certificate, evidence=evidence)
        reply = await self._call(s.KM_TRANSFER_EVIDENCE, self._seal(w.OP_EVIDENCE, body), timeout=self.timeout)
        return w.decode(reply, w.Verdict, what="km reply")

    async def update(self, client_certificate: bytes) -> w.UpdateResponse:
        body = w.UpdateRequest(client_certificate=client_certificate)
        reply = await self._call(s.KM_TRANSFER_UPDATE, self._seal(w.OP_UPDATE, body), timeout=self.timeout)
        return w.decode(reply, w.UpdateResponse, what="km reply")

    async def updated(self, client_certificate: bytes, transfer: str, version: str) -> w.Done:
        body = w.UpdatedRequest(client_certificate=client_certificate, transfer=transfer, version=version)
        reply = await self._call(s.KM_TRANSFER_UPDATED, self._seal(w.OP_UPDATED, body), timeout=self.timeout)
        return w.decode(reply, w.Done, what="km reply")

    @classmethod
    def like(cls, km: KmClient) -> TransferDeviceClient:
        """One that speaks as ``km`` does (same bus, signer, clock, trust)."""
        return cls(km.bus, km.sealer, km.clock, timeout=km.timeout, trust=km.trust)


__all__ = ["TransferDeviceClient"]
