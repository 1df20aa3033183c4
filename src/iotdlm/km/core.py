"""km's core: authenticate a signed request, authorize it, issue, record. No bus here.

The same core serves the NATS service (:mod:`iotdlm.km.service`) and the operator's CLI.
Order for every request (house style: decode -> authorize -> act -> encode):

1. bounded parse of the JWS header; who signed it (x5c) -- a module (service CA) or a device
   (operational CA); certificate checks are cached by fingerprint;
2. JWS signature, operation, audience, time window; nonce consumed in the store (replays refused
   even across km workers);
3. per request item: parse CSR/CRMF (the proof of possession is checked while parsing),
   RA authorizer (deny by default), CA signs per profile;
4. all certificates of one request recorded in one store transaction.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import time
from collections.abc import Sequence, Set
from dataclasses import dataclass, field
from typing import Protocol

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from iotdlm.clock import Clock
from iotdlm.errors import (
    BadRequestError,
    ConflictError,
    IotdlmError,
    NotAuthorizedError,
    NotFoundError,
    RejectedError,
    ReplayError,
    UnavailableError,
    UntrustedError,
)
from iotdlm.km.audit import entry
from iotdlm.km.cert_views import info, issued, record_for
from iotdlm.km.groupcommit import GroupCommit
from iotdlm.km.presented import PresentedCheck
from iotdlm.km.ra import (
    Authorizer,
    CertRequestFacts,
    DevicePrincipal,
    DeviceState,
    Grant,
    ModulePrincipal,
    Operation,
    Pop,
    PresentedCredential,
    Principal,
    authorize_revocation,
)
from iotdlm.km.registry import FactoryRegistry
from iotdlm.km.signers import SignerCache
from iotdlm.km.storage import KmStore
from iotdlm.km.va import ROOT, Va
from iotdlm.pki import est_proof
from iotdlm.pki.ca import IssuingCA, PublicUrls, active_ca, crl_partition, fingerprint
from iotdlm.pki.chain import der, load_certificate
from iotdlm.pki.csr import CsrRequest, parse_csr
from iotdlm.pki.keys import PublicKey, generate_key
from iotdlm.pki.names import check_id, device_subject
from iotdlm.pki.profiles import Profile, get_profile
from iotdlm.pki.requested import Requested, dropped
from iotdlm.store import CertRecord, DeviceRecord, NonceUse
from iotdlm.store.records import CERT_REVOKED, CertWrite
from iotdlm.wire import audit as fmt
from iotdlm.wire import envelope
from iotdlm.wire import km as msg
from iotdlm.wire.km import AUDIENCE, OP_EST, OP_EST_NONCE, OP_ISSUE, OP_ISSUE_BATCH, OP_RENEW, OP_REVOKE


class ModeCheck(Protocol):
    """What km needs of :class:`iotdlm.modes.guard.ModeGuard`: refuse what the mode forbids."""

    def require(self, allowed_modes: Set[str], what: str) -> str: ...


#: the operation modes (Table 1) in which each kind of requester may get certificates
PROVISIONING_CERTIFICATE = frozenset({"provisioning-certificate"})
CERTIFICATE_MANAGEMENT = frozenset({"certificate-management"})


@dataclass(frozen=True)
class KmSettings:
    organization: str
    urls: PublicUrls | None
    window: dt.timedelta = envelope.DEFAULT_WINDOW
    max_request_bytes: int = envelope.MAX_ENVELOPE_BYTES
    max_batch: int = msg.MAX_BATCH
    #: profiles of the presented credential ("factory": enroll, "operational": re-enroll) for which
    #: EST requests without a proof of the device's key are accepted (ADR 0008; none by default).
    #: A request WITH a proof is checked whatever this says.
    est_proof_optional: frozenset[str] = frozenset()
    #: EST serverkeygen: "encrypted" (the new private key goes back encrypted to the key of the
    #: certificate the device presented, so cm relays ciphertext; ADR 0009), "off" (refused), or
    #: "cleartext" (cm sees the key; ADR 0008)
    serverkeygen: str = "encrypted"


@dataclass(frozen=True)
class _Parsed:
    public_key: PublicKey
    subject: x509.Name | None
    pop: Pop
    #: what the request asked for, to tell the requester what the certificate leaves out
    requested: Requested = field(default_factory=Requested)


#: how long a km worker trusts what it last read of an issuing CA's revocation
CA_STATUS_TTL = 5.0
#: the store setting holding km's key for EST proof nonces (hex), shared by every km worker
EST_NONCE_KEY = "est_proof_nonce_key"


def _with_dropped(cert: msg.IssuedCertificate, what: tuple[str, ...]) -> msg.IssuedCertificate:
    """The reply, with what the request asked for and the certificate does not carry (if anything)."""
    return msgspec.structs.replace(cert, dropped=what) if what else cert


class Km:
    def __init__(
        self,
        *,
        cas: dict[str, IssuingCA],
        profiles: dict[str, Profile],
        store: KmStore,
        clock: Clock,
        settings: KmSettings,
        authorizer: Authorizer | None = None,
        va: Va | None = None,
        mode: ModeCheck | None = None,
    ) -> None:
        self.cas = cas
        self.profiles = profiles
        self.store = store
        self.clock = clock
        self.settings = settings
        self.authorizer = authorizer or Authorizer()
        self.va = va
        #: defence in depth (architecture): km checks the operation mode itself; None = no check
        #: (unit tests, the operator's offline CLI)
        self.mode = mode
        #: external factory certificates registered from an x5bag (seed 003 VII-C: CA2 accepts
        #: enrollment only from the devices of an UpdateInfoList); consulted by :meth:`presented`
        self.registry = FactoryRegistry(store, clock)
        self._signers = SignerCache(cas, store)
        self._presented = PresentedCheck(cas, store, self.registry)
        #: issuing CA name -> (monotonic time checked, revoked?): whether the operator revoked it
        #: (``ca revoke-ca``), read from the store at most every CA_STATUS_TTL seconds per worker
        self._ca_revoked: dict[str, tuple[float, bool]] = {}
        self._nonce_key: bytes | None = None
        #: every request's certificates, audit records, devices and nonce, written together with
        #: those of the requests that reach their commit at the same time (ADR 0021)
        self._group: GroupCommit[CertWrite] = GroupCommit(
            store.add_certificate_writes, shared=lambda exc: isinstance(exc, UnavailableError)
        )

    # --- 1+2: authentication ------------------------------------------------------------
    def authenticate(self, token: bytes, op: str | Sequence[str]) -> tuple[envelope.Envelope, Principal, NonceUse]:
        """Who signed ``token``, checked. The returned nonce is spent by the operation, in the
        transaction that acts on the request (or alone, if the request is refused)."""
        now = self.clock.now()
        alg, leaf = envelope.peek_signer(token, max_bytes=self.settings.max_request_bytes)
        signer = self._signers.trust(leaf, now)
        env = envelope.verify(
            token, signer.certificate, signer.key, alg=alg, op=op, aud=AUDIENCE, now=now, window=self.settings.window
        )
        principal: Principal
        if signer.kind == "module":
            assert signer.module is not None
            principal = signer.module
        else:
            fp = fingerprint(signer.certificate)
            record = self.store.get_by_fingerprint(fp)
            if record is None:
                raise UntrustedError("the device certificate that signed this request is not known to km")
            assert signer.device_id is not None
            principal = DevicePrincipal(
                device_id=signer.device_id,
                profile=record.profile,
                status=record.status,
                serial=record.serial,
                issuer=record.issuer,
                fingerprint=fp,
            )
        return env, principal, NonceUse(principal.fingerprint, env.nonce, env.iat + self.settings.window)

    def _check_mode(self, principal: Principal, what: str) -> None:
        """pm gets device certificates only while provisioning certificates; devices (through cm)
        only in certificate management. The operator's requests are not mode-bound."""
        if self.mode is None:
            return
        if isinstance(principal, ModulePrincipal) and principal.module == "pm":
            self.mode.require(PROVISIONING_CERTIFICATE, what)
        elif isinstance(principal, DevicePrincipal) or (
            isinstance(principal, ModulePrincipal) and principal.module == "cm" and what.startswith("EST")
        ):
            # (cm asking for anything but EST is the RA's to refuse, whatever the mode)
            self.mode.require(CERTIFICATE_MANAGEMENT, what)

    def _spend(self, nonce: NonceUse) -> None:
        """Spend the nonce of a request that stores nothing (a replay of it raises ReplayError);
        written with whatever other requests commit at the same time (ADR 0021)."""
        self._group.submit(CertWrite((), nonce=nonce))

    # --- 3: parse, authorize, sign ------------------------------------------------------
    def _parse_item(self, item: msg.IssueItem) -> _Parsed:
        if (item.csr is None) == (item.crmf is None):
            raise BadRequestError("give exactly one of csr or crmf", field="csr", device_id=item.device_id)
        if item.csr is not None:
            req = parse_csr(item.csr)
            return _Parsed(public_key=req.public_key, subject=req.subject, pop="signature", requested=_csr_asked(req))
        assert item.crmf is not None
        from iotdlm.pki import crmf  # CRMF/CMP's ASN.1 modules cost ~0.2 s to load: at the first CRMF request

        reqs = crmf.parse(item.crmf)
        if len(reqs) != 1:
            raise BadRequestError(f"crmf must carry exactly one CertReqMsg per item, found {len(reqs)}", field="crmf")
        r = reqs[0]
        asked = Requested(
            subject=r.subject,
            extensions=r.requested_extensions,
            unreadable_extensions=r.unreadable_extensions,
            template_fields=r.ignored_fields,
        )
        return _Parsed(public_key=r.public_key, subject=r.subject, pop=r.pop, requested=asked)

    def _device_state(self, device_id: str, known: dict[str, DeviceRecord] | None) -> DeviceState:
        rec = known.get(device_id) if known is not None else self.store.get_device(device_id)
        return DeviceState(dtype=rec.dtype, status=rec.status) if rec else DeviceState(dtype=None, status=None)

    def _sign(
        self, grant: Grant, parsed: _Parsed, principal: Principal, now: dt.datetime
    ) -> tuple[CertRecord, tuple[str, ...]]:
        """The certificate's record, and what the request asked for that the certificate does not carry."""
        _check_requested_name(parsed.subject, grant.device_id)
        profile = get_profile(self.profiles, grant.profile)
        ca = active_ca(self.cas, profile.issuer)  # after a rotation: the new generation (ADR 0026)
        self._refuse_revoked_ca(ca)
        unit = grant.dtype or profile.name
        cert = ca.issue(
            profile,
            parsed.public_key,
            device_subject(grant.device_id, self.settings.organization, unit),
            now=now,
            serial=x509.random_serial_number(),
            general_names=profile.device_names(grant.device_id, grant.dtype),
            urls=self.settings.urls,
            validity=grant.validity,
        )
        urls = self.settings.urls
        partition = (
            crl_partition(cert.serial_number, urls.crl_partitions)
            if urls is not None and profile.with_revocation_pointers
            else None
        )
        record = record_for(
            cert, ca.name, profile.name, grant.device_id, principal.describe(), now, crl_partition=partition
        )
        return record, dropped(parsed.requested, cert)

    def _refuse_revoked_ca(self, ca: IssuingCA) -> None:
        """A revoked issuing CA issues nothing more (its certificates would fail every relying
        party's check). Known to this worker at once when it revoked the CA, to the others within
        CA_STATUS_TTL seconds."""
        seen = self._ca_revoked.get(ca.name)
        if seen is None or time.monotonic() - seen[0] > CA_STATUS_TTL:
            rec = self.store.get_certificate(ROOT, ca.certificate.serial_number)
            seen = (time.monotonic(), rec is not None and rec.status == CERT_REVOKED)
            self._ca_revoked[ca.name] = seen
        if seen[1]:
            raise ConflictError(
                f"the {ca.name} CA is revoked: it issues no more certificates; a new issuing CA must take its place",
                field="profile",
            )

    def prepare(
        self,
        principal: Principal,
        item: msg.IssueItem,
        operation: Operation,
        *,
        devices: dict[str, DeviceRecord] | None = None,
    ) -> tuple[Grant, CertRecord, tuple[str, ...]]:
        """Parse, authorize and sign one item (nothing stored yet). ``devices``: the store's
        devices already read for a whole batch (else this item's device is read now). The third
        element: what the request asked for that the certificate does not carry."""
        now = self.clock.now()
        check_id(item.device_id)
        parsed = self._parse_item(item)
        facts = CertRequestFacts(
            operation=operation,
            profile=item.profile,
            device_id=item.device_id,
            pop=parsed.pop,
            device=self._device_state(item.device_id, devices),
        )
        grant = self.authorizer.authorize(principal, facts)
        rec, left_out = self._sign(grant, parsed, principal, now)
        return grant, rec, left_out

    def prepare_renewal(
        self, principal: Principal, old: CertRecord, csr: bytes | None
    ) -> tuple[Grant, CertRecord, tuple[str, ...]]:
        """Authorize and sign the renewal of ``old`` (nothing stored yet): the same device and
        profile, for the key ``old`` certifies or for the new key of ``csr`` (its signature proves
        possession). The grant supersedes ``old`` when committed."""
        if old.device_id is None:
            raise BadRequestError(f"certificate {old.serial:x} names no device; it cannot be renewed", field="serial")
        if csr is None:
            parsed = _Parsed(public_key=_public_key(load_certificate(old.der)), subject=None, pop="signature")
        else:
            parsed = self._parse_item(msg.IssueItem(device_id=old.device_id, profile=old.profile, csr=csr))
        replaces = PresentedCredential(old.profile, old.device_id, old.status, old.issuer, old.serial)
        facts = CertRequestFacts(
            operation="renew",
            profile=old.profile,
            device_id=old.device_id,
            pop=parsed.pop,
            device=self._device_state(old.device_id, None),
            replaces=replaces,
            renewable=get_profile(self.profiles, old.profile).renewable,
        )
        grant = self.authorizer.authorize(principal, facts)
        rec, left_out = self._sign(grant, parsed, principal, self.clock.now())
        return grant, rec, left_out

    # --- 4: record ----------------------------------------------------------------------
    def commit(
        self,
        pairs: list[tuple[Grant, CertRecord]],
        *,
        nonce: NonceUse | None = None,
        extra_nonces: tuple[NonceUse, ...] = (),
    ) -> list[CertRecord]:
        """Record certificates, their audit records, new devices and the request's nonce (and
        ``extra_nonces``: an EST proof's) in ONE write transaction (what keeps a provisioning line
        fast, and a replay from storing anything)."""
        now = self.clock.now()
        devices = [(g.device_id, g.dtype) for g, _r in pairs if g.dtype is not None]
        records = [rec for _g, rec in pairs]
        audit = [
            entry(
                now,
                fmt.ISSUANCE,
                rec.requested_by,
                f"{rec.issuer}:{rec.serial:x}",
                issuer=rec.issuer,
                serial=format(rec.serial, "x"),
                profile=rec.profile,
                device_id=rec.device_id,
                rule=grant.rule,
                not_after=rec.not_after.isoformat(),
                fingerprint=rec.fingerprint,
                **_supersedes(grant),
            )
            for grant, rec in pairs
        ]
        # serials are 159 random bits; the store's unique (issuer, serial) refuses a collision
        # across workers outright (SerialCollisionError), so no serial is ever issued twice.
        # Certificates and their audit records commit together or not at all.
        # Concurrent requests' writes share one transaction (group commit, ADR 0021); this returns
        # once ours is committed, and raises what ours alone raises.
        self._group.submit(
            CertWrite(
                tuple(records),
                audit=tuple(audit),
                devices=tuple(devices),
                nonce=nonce,
                now=now,
                extra_nonces=extra_nonces,
            )
        )
        for grant, rec in pairs:
            if grant.supersedes is not None:
                issuer, serial = grant.supersedes
                self.store.update_certificate_status(
                    issuer, serial, status="superseded", at=now, superseded_by=rec.serial
                )
        return records

    # --- operations ---------------------------------------------------------------------
    def issue(self, token: bytes) -> msg.IssuedCertificate:
        env, principal, nonce = self.authenticate(token, OP_ISSUE)
        try:
            self._check_mode(principal, "issuing a device certificate")
            item = msg.decode(env.body, msg.IssueItem)
            grant, rec, left_out = self.prepare(principal, item, "issue")
        except RejectedError:
            self._spend(nonce)
            raise
        (rec,) = self.commit([(grant, rec)], nonce=nonce)
        return _with_dropped(issued(rec), left_out)

    def issue_batch(self, token: bytes) -> msg.BatchIssueResponse:
        env, principal, nonce = self.authenticate(token, OP_ISSUE_BATCH)
        try:
            self._check_mode(principal, "issuing device certificates")
            req = msg.decode(env.body, msg.BatchIssueRequest)
            msg.check_batch(req, self.settings.max_batch)
        except RejectedError:
            self._spend(nonce)
            raise
        known = self.store.get_devices([item.device_id for item in req.items])
        results: list[msg.ItemResult | None] = [None] * len(req.items)
        pending: list[tuple[int, Grant, CertRecord]] = []
        left_out: dict[int, tuple[str, ...]] = {}
        seen: set[str] = set()
        for i, item in enumerate(req.items):
            try:
                if item.device_id in seen:
                    raise BadRequestError(
                        f"device {item.device_id} appears twice in this batch", device_id=item.device_id
                    )
                seen.add(item.device_id)
                grant, rec, left_out[i] = self.prepare(principal, item, "issue", devices=known)
                pending.append((i, grant, rec))
            except RejectedError as exc:
                results[i] = msg.ItemResult(device_id=item.device_id, error=_error_info(exc))
        if pending:
            records = self.commit([(g, r) for _i, g, r in pending], nonce=nonce)
            for (i, _g, _r), rec in zip(pending, records, strict=True):
                certificate = _with_dropped(issued(rec), left_out[i])
                results[i] = msg.ItemResult(device_id=req.items[i].device_id, certificate=certificate)
        else:
            self._spend(nonce)
        return msg.BatchIssueResponse(results=[r for r in results if r is not None])

    def renew(self, token: bytes) -> msg.IssuedCertificate:
        env, principal, nonce = self.authenticate(token, OP_RENEW)
        try:
            self._check_mode(principal, "renewing a device certificate")
            if not isinstance(principal, DevicePrincipal):
                raise BadRequestError("renewal requests are signed by the device with its current certificate")
            req = msg.decode(env.body, msg.RenewRequest)
            item = msg.IssueItem(device_id=principal.device_id, profile="operational", csr=req.csr)
            grant, rec, left_out = self.prepare(principal, item, "renew")
        except RejectedError:
            self._spend(nonce)
            raise
        (rec,) = self.commit([(grant, rec)], nonce=nonce)
        return _with_dropped(issued(rec), left_out)

    def presented(self, der_cert: bytes) -> PresentedCredential:
        """Check, independently of cm, the certificate a device presented at the TLS edge: issued by
        our factory or operational CA, valid now, known to km (recorded), and its status -- or an
        external factory certificate registered in :attr:`registry` (nothing else from outside)."""
        return self._presented.check(der_cert, self.clock.now())[0]

    # --- EST: the device's proof of its current key (ADR 0008) --------------------------------
    def _est_nonce_key(self) -> bytes:
        """km's key for proof nonces: made by the first worker that needs it, kept in the store so
        every worker shares it (the store's first writer wins)."""
        if self._nonce_key is None:
            self._nonce_key = bytes.fromhex(self.store.setdefault_meta(EST_NONCE_KEY, secrets.token_hex(32)))
        return self._nonce_key

    def est_nonce(self, token: bytes) -> msg.EstNonceResponse:
        """A fresh nonce for the device that presented ``client_certificate`` to cm: the device signs
        it with that certificate's key (:mod:`iotdlm.pki.est_proof`). Only cm asks."""
        env, principal, nonce = self.authenticate(token, OP_EST_NONCE)
        self._spend(nonce)
        now = self.clock.now()
        if not (isinstance(principal, ModulePrincipal) and principal.module == "cm"):
            raise NotAuthorizedError(f"{principal.describe()} may not ask for EST proof nonces (cm relays them)")
        self._check_mode(principal, "EST enrollment")
        req = msg.decode(env.body, msg.EstNonceRequest)
        self.presented(req.client_certificate)
        fp = hashlib.sha256(req.client_certificate).hexdigest()
        value = est_proof.issue_nonce(self._est_nonce_key(), fp, now)
        return msg.EstNonceResponse(nonce=value, expires=(now + est_proof.NONCE_TTL).isoformat())

    def _check_est_proof(
        self, req: msg.EstRequest, cred: PresentedCredential, new_key: PublicKey, now: dt.datetime
    ) -> NonceUse | None:
        """The proof nonce to spend with the issuance, after checking the device signed this request
        with the key of the certificate it presented; None when the policy lets a request without a
        proof through. Refusals raise (and km audits them)."""
        if req.proof is None:
            if cred.profile in self.settings.est_proof_optional:
                return None
            raise NotAuthorizedError(
                f"EST {req.operation} for device {cred.device_id} carries no proof that the device holds the key "
                f"of its {cred.profile} certificate: send the {est_proof.HEADER} header (fetch a nonce from "
                "/.well-known/est/iotdlm-nonce first)",
                field="proof",
                device_id=cred.device_id,
            )
        try:
            proof = est_proof.parse(req.proof)
            fp = hashlib.sha256(req.client_certificate).hexdigest()
            expires = est_proof.nonce_expiry(proof.nonce, self._est_nonce_key(), fp, now)
            current = _public_key(load_certificate(req.client_certificate))
            est_proof.verify(proof, current, req.operation, new_key)
        except RejectedError as exc:
            exc.device_id = exc.device_id or cred.device_id  # the audit record names the device
            raise
        return NonceUse(f"est-proof:{fp}", proof.nonce, expires)

    def est(self, token: bytes) -> msg.EstResponse:
        """EST simpleenroll / simplereenroll / serverkeygen relayed by cm (RFC 7030)."""
        env, principal, nonce = self.authenticate(token, OP_EST)
        now = self.clock.now()
        try:
            self._check_mode(principal, "EST enrollment")
            req = msg.decode(env.body, msg.EstRequest)
            if req.operation not in ("simpleenroll", "simplereenroll", "serverkeygen"):
                raise BadRequestError(f"unknown EST operation {req.operation!r}", field="operation")
            cred, device = self._presented.check(req.client_certificate, now)
            reenroll = req.operation == "simplereenroll" or (
                req.operation == "serverkeygen" and cred.profile == "operational"
            )
            server_keygen = req.operation == "serverkeygen"
            if server_keygen and self.settings.serverkeygen not in ("encrypted", "cleartext"):
                raise NotAuthorizedError(
                    "EST serverkeygen is off in this deployment: make the key on the device and use "
                    'simpleenroll, or have the operator set est_serverkeygen = "encrypted" '
                    "(docs/adr/0009-encrypted-server-generated-keys.md)",
                    field="operation",
                    device_id=cred.device_id,
                )
            csr = parse_csr(req.csr)
            _check_requested_name(csr.subject, cred.device_id)
            facts = CertRequestFacts(
                operation="est_reenroll" if reenroll else "est_enroll",
                profile="operational",
                device_id=cred.device_id,
                pop="server_generated" if server_keygen else "signature",
                device=self._device_state(cred.device_id, {} if device is None else {device.device_id: device}),
                presented=cred,
            )
            grant = self.authorizer.authorize(principal, facts)
            # cm relayed it; only the device's own key proves the device asked (ADR 0008)
            proof_nonce = self._check_est_proof(req, cred, csr.public_key, now)
            private_key: bytes | None = None
            encrypted_key: bytes | None = None
            public_key = csr.public_key
            if server_keygen:
                key = generate_key(self.cas["operational"].signer.algorithm)
                public_key = key.public_key()
                pkcs8 = key.private_bytes(
                    serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
                if self.settings.serverkeygen == "cleartext":
                    private_key = pkcs8
                else:
                    # RFC 7030 4.4.2: to the key of the certificate the device presented (and proved
                    # it holds, ADR 0008), before anything is issued; cm relays only ciphertext
                    encrypted_key = self._encrypt_to_device(pkcs8, req.client_certificate, cred.device_id)
            parsed = _Parsed(public_key=public_key, subject=csr.subject, pop=facts.pop, requested=_csr_asked(csr))
            rec, left_out = self._sign(grant, parsed, principal, now)
        except RejectedError:
            self._spend(nonce)
            raise
        # the proof nonce is single use: spent in the issuance's own transaction (a concurrent
        # replay loses the race on the store's primary key, and stores nothing)
        proofs = () if proof_nonce is None else (proof_nonce,)
        try:
            (rec,) = self.commit([(grant, rec)], nonce=nonce, extra_nonces=proofs)
        except ReplayError as exc:
            if not proofs:
                raise
            # the transaction stored nothing, this request's nonce neither; spending it alone
            # tells whose nonce was replayed (raising ReplayError if it was the request's)
            self._spend(nonce)
            exc.device_id = exc.device_id or cred.device_id  # the audit record names the device
            raise
        return msg.EstResponse(
            certificate=_with_dropped(issued(rec), left_out), private_key=private_key, encrypted_key=encrypted_key
        )

    @staticmethod
    def _encrypt_to_device(pkcs8: bytes, client_certificate: bytes, device_id: str) -> bytes:
        """The server-generated key in a CMS EnvelopedData to the presented credential's key (ADR 0009)."""
        try:
            from iotdlm.pki import cms_envelope  # CMS's ASN.1 modules: at the first serverkeygen

            return cms_envelope.encrypt_key(pkcs8, load_certificate(client_certificate))
        except RejectedError as exc:  # an Ed25519 credential cannot receive an encrypted key
            exc.device_id = exc.device_id or device_id
            raise

    def revoke(self, token: bytes) -> msg.RevokeResponse:
        """Revoke a certificate, or all of a device's (optionally decommissioning it). Operator only."""
        if self.va is None:
            raise RuntimeError("this km has no validation authority configured")
        env, principal, nonce = self.authenticate(token, OP_REVOKE)
        self._spend(nonce)
        authorize_revocation(principal)
        req = msg.decode(env.body, msg.RevokeRequest)
        actor = principal.describe()
        if req.ca is not None:
            out_ca = self.va.revoke_ca_request(req, actor=actor)
            self._ca_revoked.pop(req.ca, None)
            return msg.RevokeResponse(revoked=[info(out_ca)])
        if (req.serial is None) == (req.device_id is None):
            raise BadRequestError("give exactly one of serial or device_id", field="serial")
        if req.serial is not None:
            if req.decommission:
                raise BadRequestError("decommission applies to a device_id, not a serial", field="decommission")
            serial = _hex_serial(req.serial)
            out = [self.va.revoke(serial, issuer=req.issuer, reason=req.reason, actor=actor)]
        else:
            assert req.device_id is not None
            check_id(req.device_id)
            if req.decommission:
                out = self.va.decommission(req.device_id, actor=actor, reason=req.reason or "cessationOfOperation")
            else:
                out = self.va.revoke_device(req.device_id, reason=req.reason, actor=actor)
        return msg.RevokeResponse(revoked=[info(r) for r in out])

    def chain(self) -> msg.ChainResponse:
        root = next(iter(self.cas.values())).root
        chains = {name: [der(c) for c in ca.chain] for name, ca in self.cas.items()}
        now = self.clock.now()  # past its overlap, a rotated-out CA leaves /cacerts (ADR 0026)
        return msg.ChainResponse(
            root=der(root), chains=chains, not_in_cacerts=[n for n, ca in self.cas.items() if not ca.in_cacerts(now)]
        )

    def factory_cas(self) -> msg.FactoryCasResponse:
        """The registered external factory CAs (seed 003 VII-C): cm's TLS accepts device client
        certificates from them."""
        return msg.FactoryCasResponse(certificates=[der(c) for c in self.registry.client_cas()])

    def get(self, req: msg.GetRequest) -> msg.CertificateInfo:
        serial = _hex_serial(req.serial)
        recs = (
            [r for r in [self.store.get_certificate(req.issuer, serial)] if r]
            if req.issuer
            else self.store.find_by_serial(serial)
        )
        if not recs:
            raise NotFoundError(f"no certificate with serial {req.serial}", field="serial")
        return info(recs[0])


def _hex_serial(text: str) -> int:
    try:
        serial = int(text, 16)
    except ValueError:
        raise BadRequestError(f"serial {text!r} is not hexadecimal", field="serial") from None
    if not 0 < serial < 2**160:
        raise BadRequestError(f"serial {text!r} is out of range", field="serial")
    return serial


def _supersedes(grant: Grant) -> dict[str, str]:
    """The audit field naming the certificate a renewal replaces (none for a first issuance)."""
    return {} if grant.supersedes is None else {"supersedes": "{}:{:x}".format(*grant.supersedes)}


def _public_key(cert: x509.Certificate) -> PublicKey:
    from iotdlm.pki.keys import check_public_key

    return check_public_key(cert.public_key())


def _check_requested_name(subject: x509.Name | None, device_id: str) -> None:
    """A CSR/CRMF may name the device in its CN; if it does, it must be the device asked for."""
    if subject is None:
        return
    cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns and cns[0].value != device_id:
        raise BadRequestError(
            f"the request's subject CN {cns[0].value!r} does not match device id {device_id!r}",
            field="subject",
            device_id=device_id,
        )


def _csr_asked(req: CsrRequest) -> Requested:
    return Requested(
        subject=req.subject, extensions=req.requested_extensions, unreadable_extensions=req.unreadable_extensions
    )


def _error_info(exc: IotdlmError) -> msg.ErrorInfo:
    return msg.ErrorInfo(code=exc.code, message=exc.message, field=exc.field)
