"""Client of km's bus API: signs each request with the caller's identity (module or device), and
verifies km's signed replies (ADR 0006).

With a :class:`KmTrust` (every module as ``iotdlm`` runs it) a reply counts only if km signed it:
the signer certificate is issued by the deployment's service CA, names module km and is valid
now, is not on the service CA's CRL (when the trust has :class:`~iotdlm.pki.revocation.ServiceCrls`:
fetched from km's VA, checked against the CA's signature), and the reply answers this very request
on this subject within the time window. Anything
else -- a forged acknowledgement, a forged "not found", an unsigned error reply -- raises
:class:`~iotdlm.errors.UntrustedError` ("km reply is not valid: ...") and nothing is acted on. An
error the bus raises itself (no responder, timeout, a refused publish, a request over the size
limit) is not km's answer and passes as it is: it means km did not answer.

Without a trust (unit-test harnesses whose km has no identity) replies are taken as they come.
OCSP responses and CRLs are never wrapped: the CA signed them, and their consumers verify that.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.oid import ExtendedKeyUsageOID

from iotdlm.bus import Bus
from iotdlm.bus import subjects as s
from iotdlm.client import revocation
from iotdlm.clock import Clock
from iotdlm.errors import (
    IotdlmError,
    PermissionDeniedError,
    RejectedError,
    TooLargeError,
    UnavailableError,
    UntrustedError,
    from_wire,
)
from iotdlm.pki.chain import load_certificate, verify_issued_by
from iotdlm.pki.keys import check_public_key
from iotdlm.pki.names import module_of
from iotdlm.pki.revocation import RevokedSignerError, ServiceCrls
from iotdlm.wire import audit as wire_audit
from iotdlm.wire import envelope
from iotdlm.wire import km as msg
from iotdlm.wire.envelope import Sealer
from iotdlm.wire.km import AUDIENCE, OP_EST, OP_EST_NONCE, OP_ISSUE, OP_ISSUE_BATCH, OP_RENEW, OP_REVOKE

#: the errors a bus raises by itself (no answer, refused publish, request too large): not km's word
_BUS_ERRORS = (UnavailableError, PermissionDeniedError, TooLargeError)


@dataclass(frozen=True)
class _TrustedKm:
    certificate: x509.Certificate
    key: envelope.JoseKey


class KmTrust:
    """What a km reply must chain to: the deployment's service CA, and module ``km``.

    The chain check of a km certificate is cached by fingerprint (one signature check per km
    certificate, not per reply); the validity period is checked against the caller's clock on
    every reply.
    """

    def __init__(self, service_ca: x509.Certificate, *, crls: ServiceCrls | None = None) -> None:
        self.service_ca = service_ca
        #: the service CA's CRLs: a revoked km certificate is refused (None: not checked)
        self.crls = crls
        self._cache: dict[str, _TrustedKm] = {}
        self._lock = threading.Lock()

    def certificate_for(self, leaf_der: bytes, now: dt.datetime) -> x509.Certificate:
        """A km certificate (DER) that chains to the service CA and names km, or UntrustedError."""
        return self._trusted(leaf_der, now).certificate

    def _trusted(self, leaf_der: bytes, now: dt.datetime) -> _TrustedKm:
        fp = hashlib.sha256(leaf_der).hexdigest()
        cached = self._cache.get(fp)
        if cached is None:
            cached = self._check(leaf_der, now)
            with self._lock:
                if len(self._cache) > 64:
                    self._cache.clear()
                self._cache[fp] = cached
        return cached

    def key_for(self, leaf_der: bytes, now: dt.datetime) -> envelope.JoseKey:
        """The key of a km certificate (DER) trusted at ``now``, or UntrustedError
        (:class:`~iotdlm.pki.revocation.RevokedSignerError` for a revoked one)."""
        cached = self._trusted(leaf_der, now)
        cert = cached.certificate
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise UntrustedError(
                f"km reply is not valid: the signer certificate is not valid at {now.isoformat()} "
                f"(valid {cert.not_valid_before_utc.isoformat()} to {cert.not_valid_after_utc.isoformat()})"
            )
        if self.crls is not None:
            try:
                self.crls.check(cert)
            except RevokedSignerError as exc:
                raise RevokedSignerError(f"km reply is not valid: {exc.message}") from None
        return cached.key

    def _check(self, leaf_der: bytes, now: dt.datetime) -> _TrustedKm:
        try:
            cert = load_certificate(leaf_der)
            if cert.issuer != self.service_ca.subject:
                raise UntrustedError(
                    f"the signer certificate is issued by {cert.issuer.rfc4514_string()}, not by the service CA"
                )
            verify_issued_by(cert, self.service_ca, now=now, eku=ExtendedKeyUsageOID.CLIENT_AUTH)
            ident = module_of(cert)
            if ident is None or ident[0] != "km":
                who = "no module" if ident is None else f"module {ident[0]}"
                raise UntrustedError(f"the signer certificate names {who}, not km")
            key = envelope.jose_key(check_public_key(cert.public_key()))
        except RejectedError as exc:
            raise UntrustedError(f"km reply is not valid: {exc.message}") from exc
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise UntrustedError("km reply is not valid: the signer certificate is malformed") from exc
        return _TrustedKm(certificate=cert, key=key)


class KmClient:
    def __init__(
        self, bus: Bus, sealer: Sealer, clock: Clock, *, timeout: float = 10.0, trust: KmTrust | None = None
    ) -> None:
        self.bus = bus
        self.sealer = sealer
        self.clock = clock
        self.timeout = timeout
        #: None: replies are not verified (test harnesses only; see the module doc)
        self.trust = trust

    def _seal(self, op: str, body: object) -> bytes:
        return self.sealer.seal(op, body, aud=AUDIENCE, now=self.clock.now())

    @staticmethod
    def _nonce() -> str:
        """Makes an unsigned request (chain, get) unique, so km's signed reply binds to it alone."""
        return secrets.token_urlsafe(18)

    async def _call(self, subject: str, request: bytes, timeout: float) -> bytes:  # noqa: ASYNC109
        """The body of km's reply to ``request``, verified when the client has a trust."""
        trust = self.trust
        if trust is None:
            return await self.bus.request(subject, request, timeout=timeout)
        try:
            token = await self.bus.request(subject, request, timeout=timeout)
        except _BUS_ERRORS:
            raise
        except IotdlmError as exc:
            # km signs its errors: a plain error reply came from someone else on the inbox
            raise UntrustedError(
                f"km reply is not valid: an unsigned error reply ({exc.code}: {exc.message[:200]}) did not come from km"
            ) from exc
        now = self.clock.now()
        if len(token) > envelope.MAX_ENVELOPE_BYTES:
            # not a forgery: km said more than one reply may carry (ADR 0019: large answers go in parts)
            raise TooLargeError(
                f"km's reply on {subject} is {len(token) / 2**20:.1f} MB; the limit is "
                f"{envelope.MAX_ENVELOPE_BYTES / 2**20:.1f} MB: ask for less at once"
            )
        try:
            alg, leaf = envelope.peek_signer(token)
        except RejectedError as exc:
            raise UntrustedError(f"km reply is not valid: it is not a signed reply ({exc.message})") from exc
        if trust.crls is not None:
            # the service CA's CRLs of km's partition, when this client has none fresh
            await revocation.refresh(trust.crls, self.bus, trust.certificate_for(leaf, now), now)
        try:
            key = trust.key_for(leaf, now)
        except RevokedSignerError as exc:
            await revocation.alarm(self.bus, "km", exc.message)
            raise
        try:
            reply = envelope.verify_reply(token, key, alg=alg, subject=subject, request=request, now=now)
        except RejectedError as exc:
            raise UntrustedError(f"km reply is not valid: {exc.message}") from exc
        if not reply.error:
            return reply.body
        try:
            wire = msgspec.json.decode(reply.body, type=dict[str, object])
        except msgspec.DecodeError as exc:
            raise UntrustedError("km reply is not valid: its error is not valid JSON") from exc
        raise from_wire(wire)

    async def issue(
        self, device_id: str, profile: str, *, csr: bytes | None = None, crmf: bytes | None = None
    ) -> msg.IssuedCertificate:
        token = self._seal(OP_ISSUE, msg.IssueItem(device_id=device_id, profile=profile, csr=csr, crmf=crmf))
        reply = await self._call(s.KM_ISSUE, token, timeout=self.timeout)
        return msg.decode(reply, msg.IssuedCertificate, what="km reply")

    async def issue_batch(self, items: Sequence[msg.IssueItem]) -> list[msg.ItemResult]:
        token = self._seal(OP_ISSUE_BATCH, msg.BatchIssueRequest(items=list(items)))
        reply = await self._call(s.KM_ISSUE_BATCH, token, timeout=self.timeout + len(items) * 0.05)
        return msg.decode(reply, msg.BatchIssueResponse, what="km reply").results

    async def renew(self, csr: bytes) -> msg.IssuedCertificate:
        token = self._seal(OP_RENEW, msg.RenewRequest(csr=csr))
        reply = await self._call(s.KM_RENEW, token, timeout=self.timeout)
        return msg.decode(reply, msg.IssuedCertificate, what="km reply")

    async def chain(self) -> msg.ChainResponse:
        # a fresh body, so that the signed reply is bound to this request (km ignores it)
        reply = await self._call(s.KM_CHAIN, msg.encode({"nonce": self._nonce()}), timeout=self.timeout)
        return msg.decode(reply, msg.ChainResponse, what="km reply")

    async def factory_cas(self) -> list[x509.Certificate]:
        """The external factory CAs registered with km for a trust transfer (cm's TLS trusts them)."""
        reply = await self._call(s.KM_FACTORY_CAS, msg.encode({"nonce": self._nonce()}), timeout=self.timeout)
        out = msg.decode(reply, msg.FactoryCasResponse, what="km reply")
        try:
            return [load_certificate(c) for c in out.certificates]
        except RejectedError as exc:
            raise UntrustedError(
                f"km reply is not valid: a factory CA certificate is malformed ({exc.message})"
            ) from exc

    async def get(self, serial: str, issuer: str | None = None) -> msg.CertificateInfo:
        reply = await self._call(
            s.KM_GET,
            msg.encode(msg.GetRequest(serial=serial, issuer=issuer, nonce=self._nonce())),
            timeout=self.timeout,
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
        reply = await self._call(s.KM_REVOKE, self._seal(OP_REVOKE, body), timeout=self.timeout)
        return msg.decode(reply, msg.RevokeResponse, what="km reply").revoked

    async def ocsp(self, request_der: bytes) -> bytes:
        """An OCSP request (DER) answered by km's VA (DER OCSPResponse)."""
        return await self.bus.request(s.KM_OCSP, request_der, timeout=self.timeout)

    async def crl(self, issuer: str, partition: int, *, delta: bool = False) -> bytes:
        """The current CRL (DER) of one partition of one issuing CA."""
        body = msg.encode(msg.CrlRequest(issuer=issuer, partition=partition, delta=delta))
        return await self.bus.request(s.KM_CRL, body, timeout=self.timeout)

    async def audit_checkpoint(self) -> bytes:
        """km's newest signed tree head of the audit log (JSON, :class:`iotdlm.wire.audit.TreeHead`)."""
        return await self.bus.request(s.KM_AUDIT_CHECKPOINT, b"{}", timeout=self.timeout)

    async def audit_consistency(self, first: int, second: int) -> wire_audit.ConsistencyProof:
        """km's RFC 9162 consistency proof between the audit log's first ``first`` and ``second``
        records (a signed reply, like every km answer but the tree head itself)."""
        req = wire_audit.ConsistencyRequest(first=first, second=second, nonce=self._nonce())
        reply = await self._call(s.KM_AUDIT_CONSISTENCY, wire_audit.encode_consistency_request(req), self.timeout)
        proof = wire_audit.decode_consistency_proof(reply, where="km reply")
        if (proof.first, proof.second) != (first, second):
            raise UntrustedError(
                f"km reply is not valid: a proof for {proof.first}..{proof.second}, not {first}..{second}"
            )
        return proof

    async def transfer_peer(self, subject: str, body: bytes) -> bytes:
        """Relay what a peer provider sent in a trust transfer (cm, issue 13); km's signed reply."""
        if not subject.startswith(s.KM_TRANSFER_PEER + "."):
            raise ValueError(f"{subject!r} is not a transfer subject")
        return await self._call(subject, body, timeout=self.timeout)

    async def est_nonce(self, client_certificate: bytes) -> msg.EstNonceResponse:
        """A proof nonce for the device that presented ``client_certificate`` (cm relays it)."""
        token = self._seal(OP_EST_NONCE, msg.EstNonceRequest(client_certificate=client_certificate))
        reply = await self._call(s.KM_EST_NONCE, token, timeout=self.timeout)
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
        reply = await self._call(subject, self._seal(OP_EST, body), timeout=self.timeout)
        return msg.decode(reply, msg.EstResponse, what="km reply")
