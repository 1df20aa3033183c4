"""Client of km's bus API: signs each request with the caller's identity (module or device)."""

from __future__ import annotations

from collections.abc import Sequence

from iotdlm.bus import Bus
from iotdlm.bus import subjects as s
from iotdlm.clock import Clock
from iotdlm.wire import km as msg
from iotdlm.wire.envelope import Sealer
from iotdlm.wire.km import AUDIENCE, OP_EST, OP_EST_NONCE, OP_ISSUE, OP_ISSUE_BATCH, OP_RENEW, OP_REVOKE


class KmClient:
    def __init__(self, bus: Bus, sealer: Sealer, clock: Clock, *, timeout: float = 10.0) -> None:
        self.bus = bus
        self.sealer = sealer
        self.clock = clock
        self.timeout = timeout

    def _seal(self, op: str, body: object) -> bytes:
        return self.sealer.seal(op, body, aud=AUDIENCE, now=self.clock.now())

    async def issue(
        self, device_id: str, profile: str, *, csr: bytes | None = None, crmf: bytes | None = None
    ) -> msg.IssuedCertificate:
        token = self._seal(OP_ISSUE, msg.IssueItem(device_id=device_id, profile=profile, csr=csr, crmf=crmf))
        reply = await self.bus.request(s.KM_ISSUE, token, timeout=self.timeout)
        return msg.decode(reply, msg.IssuedCertificate, what="km reply")

    async def issue_batch(self, items: Sequence[msg.IssueItem]) -> list[msg.ItemResult]:
        token = self._seal(OP_ISSUE_BATCH, msg.BatchIssueRequest(items=list(items)))
        reply = await self.bus.request(s.KM_ISSUE_BATCH, token, timeout=self.timeout + len(items) * 0.05)
        return msg.decode(reply, msg.BatchIssueResponse, what="km reply").results

    async def renew(self, csr: bytes) -> msg.IssuedCertificate:
        token = self._seal(OP_RENEW, msg.RenewRequest(csr=csr))
        reply = await self.bus.request(s.KM_RENEW, token, timeout=self.timeout)
        return msg.decode(reply, msg.IssuedCertificate, what="km reply")

    async def chain(self) -> msg.ChainResponse:
        reply = await self.bus.request(s.KM_CHAIN, b"{}", timeout=self.timeout)
        return msg.decode(reply, msg.ChainResponse, what="km reply")

    async def get(self, serial: str, issuer: str | None = None) -> msg.CertificateInfo:
        reply = await self.bus.request(
            s.KM_GET, msg.encode(msg.GetRequest(serial=serial, issuer=issuer)), timeout=self.timeout
        )
        return msg.decode(reply, msg.CertificateInfo, what="km reply")

    async def revoke(
        self,
        *,
        serial: str | None = None,
        issuer: str | None = None,
        device_id: str | None = None,
        reason: str | None = None,
        decommission: bool = False,
        ca: str | None = None,
    ) -> list[msg.CertificateInfo]:
        body = msg.RevokeRequest(
            serial=serial, issuer=issuer, device_id=device_id, reason=reason, decommission=decommission, ca=ca
        )
        reply = await self.bus.request(s.KM_REVOKE, self._seal(OP_REVOKE, body), timeout=self.timeout)
        return msg.decode(reply, msg.RevokeResponse, what="km reply").revoked

    async def ocsp(self, request_der: bytes) -> bytes:
        """An OCSP request (DER) answered by km's VA (DER OCSPResponse)."""
        return await self.bus.request(s.KM_OCSP, request_der, timeout=self.timeout)

    async def crl(self, issuer: str, partition: int, *, delta: bool = False) -> bytes:
        """The current CRL (DER) of one partition of one issuing CA."""
        body = msg.encode(msg.CrlRequest(issuer=issuer, partition=partition, delta=delta))
        return await self.bus.request(s.KM_CRL, body, timeout=self.timeout)

    async def est_nonce(self, client_certificate: bytes) -> msg.EstNonceResponse:
        """A proof nonce for the device that presented ``client_certificate`` (cm relays it)."""
        token = self._seal(OP_EST_NONCE, msg.EstNonceRequest(client_certificate=client_certificate))
        reply = await self.bus.request(s.KM_EST_NONCE, token, timeout=self.timeout)
        return msg.decode(reply, msg.EstNonceResponse, what="km reply")

    async def est(
        self, operation: str, client_certificate: bytes, csr: bytes, *, proof: str | None = None
    ) -> msg.EstResponse:
        """Relay an EST operation (cm): simpleenroll, simplereenroll or serverkeygen."""
        subject = {
            "simpleenroll": s.KM_EST_SIMPLEENROLL,
            "simplereenroll": s.KM_EST_SIMPLEREENROLL,
            "serverkeygen": s.KM_EST_SERVERKEYGEN,
        }.get(operation)
        if subject is None:
            raise ValueError(f"unknown EST operation {operation!r}")
        body = msg.EstRequest(operation=operation, client_certificate=client_certificate, csr=csr, proof=proof)
        reply = await self.bus.request(subject, self._seal(OP_EST, body), timeout=self.timeout)
        return msg.decode(reply, msg.EstResponse, what="km reply")
