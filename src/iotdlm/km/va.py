"""Validation authority: revocation, partitioned full and delta CRLs, and an OCSP responder.

- Revocation is recorded in the store together with its audit record; OCSP answers from the store,
  so a revocation shows at once (cached responses for it are dropped at once in this worker, and in
  other workers by the ``revoked`` event).
- CRLs are partitioned per issuing CA (certificates name their partition in their CRL distribution
  point) and only list certificates that have not expired, so no CRL grows without bound. A delta
  CRL lists what was revoked since its base full CRL (with an overlap, so a revocation committed
  while the base was being built is never missed). Full and delta CRLs of one partition share one
  strictly increasing CRL number sequence (RFC 5280 5.2.3).
- The root CA publishes one full CRL (issuer ``root``, partition 0, no delta) of the issuing-CA
  certificates it revoked (:meth:`Va.revoke_ca`); issuing-CA certificates name it in their CRL
  distribution point. It is made with the root key, so only a km that loaded it can make it.
- OCSP responses are signed by a delegated responder certificate per CA (id-kp-OCSPSigning,
  ocsp-nocheck). Requests without a nonce are answered from a cache of pre-signed responses;
  requests with a nonce are signed on demand so the nonce can be echoed (RFC 6960 4.4.1). No
  error inside the VA reaches an OCSP client as anything but an ``internalError`` response.
- Revocation reasons: ``removeFromCRL`` and ``certificateHold`` are refused
  (:func:`iotdlm.pki.crl.revocation_reason`).
- A certificate superseded at re-enrollment (status ``superseded``, ``revoked_at`` the moment it
  was superseded) stays good for ``VaSettings.superseded_grace`` -- a device in the middle of
  switching may still present it -- and from then on is revoked, reason ``superseded``, at
  ``revoked_at + superseded_grace``, for OCSP and CRLs alike (and EST refuses it at once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from iotdlm.clock import Clock
from iotdlm.errors import BadRequestError, ConflictError, IotdlmError, NotFoundError
from iotdlm.km.audit import entry
from iotdlm.km.cert_views import record_for
from iotdlm.km.storage import VaStore
from iotdlm.pki import crl as pki_crl
from iotdlm.pki import ocsp as pki_ocsp
from iotdlm.pki.ca import IssuingCA, PublicUrls
from iotdlm.pki.keys import KeySigner, generate_key
from iotdlm.pki.profiles import Profile
from iotdlm.pki.rotation import CaState
from iotdlm.store import CertRecord, CrlRecord
from iotdlm.wire import audit as fmt
from iotdlm.wire.km import RevokeRequest

log = logging.getLogger(__name__)

#: a delta CRL re-lists revocations this long before its base was made, in case one committed
#: while the base was being built
DELTA_OVERLAP = dt.timedelta(minutes=5)

#: the issuer name of the root CA's CRL (of issuing-CA certificates) and of their store records
ROOT = "root"
#: the profile name of an issuing-CA certificate's store record
CA_PROFILE = "ca"


@dataclass(frozen=True)
class VaSettings:
    urls: PublicUrls
    crl_validity: dt.timedelta = dt.timedelta(days=1)
    delta_validity: dt.timedelta = dt.timedelta(hours=1)
    ocsp_validity: dt.timedelta = dt.timedelta(hours=1)
    responder_renew_before: dt.timedelta = dt.timedelta(days=7)
    cache_size: int = 200_000
    #: how long a certificate superseded at re-enrollment stays good before it counts as revoked
    superseded_grace: dt.timedelta = dt.timedelta(hours=1)

    def __post_init__(self) -> None:
        if self.superseded_grace < dt.timedelta(0):
            raise ValueError("superseded_grace must not be negative")


class Va:
    def __init__(
        self,
        *,
        cas: dict[str, IssuingCA],
        profiles: dict[str, Profile],
        store: VaStore,
        clock: Clock,
        settings: VaSettings,
        root: IssuingCA | None = None,
    ) -> None:
        if ROOT in cas:
            raise ValueError(f"no issuing CA may be called {ROOT!r}")
        self.cas = cas
        self.root = root
        self.profiles = profiles
        self.store = store
        self.clock = clock
        self.settings = settings
        self._responders: dict[str, pki_ocsp.Responder] = {}
        self._cache: OrderedDict[tuple[str, int, str], tuple[bytes, dt.datetime]] = OrderedDict()
        #: (issuer, serial) -> (the store's status row, kept until): answers with a nonce are signed
        #: on demand but need not read the database each time; dropped with the cached answers
        self._status: OrderedDict[tuple[str, int], tuple[_Status, dt.datetime]] = OrderedDict()
        self._lock = threading.Lock()
        #: bumped by every invalidation: what was read before one is not kept after it
        self._generation = 0

    # --- revocation ---------------------------------------------------------------------------
    def find(self, serial: int, issuer: str | None = None) -> CertRecord:
        if issuer is not None:
            rec = self.store.get_certificate(issuer, serial)
            if rec is None:
                raise NotFoundError(f"no certificate {serial:x} from the {issuer} CA", field="serial")
            return rec
        recs = self.store.find_by_serial(serial)
        if not recs:
            raise NotFoundError(f"no certificate with serial {serial:x}", field="serial")
        if len(recs) > 1:
            raise BadRequestError(
                f"serial {serial:x} exists under several CAs ({', '.join(r.issuer for r in recs)}); name the issuer",
                field="issuer",
            )
        return recs[0]

    def revoke(self, serial: int, *, issuer: str | None, reason: str | None, actor: str) -> CertRecord:
        """Revoke one certificate (RFC 5280 reason name); ConflictError if it already is."""
        reason = pki_crl.revocation_reason(reason)
        rec = self.find(serial, issuer)
        out = self.store.revoke_certificate(rec.issuer, rec.serial, reason=reason, at=self.clock.now(), actor=actor)
        self.revoked([out])
        return out

    def revoke_device(self, device_id: str, *, reason: str | None, actor: str) -> list[CertRecord]:
        out = self.store.revoke_device_certificates(
            device_id, reason=pki_crl.revocation_reason(reason), at=self.clock.now(), actor=actor
        )
        self.revoked(out)
        return out

    def decommission(
        self, device_id: str, *, actor: str, reason: str | None = "cessationOfOperation"
    ) -> list[CertRecord]:
        """End of life: revoke everything the device holds, retire it; km refuses it from now on."""
        out = self.store.decommission_device(
            device_id, reason=pki_crl.revocation_reason(reason), at=self.clock.now(), actor=actor
        )
        self.revoked(out)
        return out

    def revoke_ca(self, name: str, *, reason: str | None, actor: str) -> CertRecord:
        """Revoke issuing CA ``name``'s certificate: recorded as a certificate of issuer ``root``
        (added to the store first if init did not record it), audited like any revocation, and
        listed at once on the root's CRL (made anew here when this km holds the root key)."""
        reason = pki_crl.revocation_reason(reason)
        ca = self.cas.get(name) if isinstance(name, str) else None
        if ca is None:
            raise NotFoundError(
                f"no issuing CA {str(name)[:40]!r}; issuing CAs: {', '.join(sorted(self.cas))}", field="ca"
            )
        now = self.clock.now()
        serial = ca.certificate.serial_number
        if self.store.get_certificate(ROOT, serial) is None:
            with contextlib.suppress(ConflictError):  # another worker recorded it meanwhile
                self.store.add_certificates([ca_record(ca.certificate, actor, now)])
        out = self.store.revoke_certificate(ROOT, serial, reason=reason, at=now, actor=actor)
        self.revoked([out])
        return out

    def revoke_ca_request(self, req: RevokeRequest, *, actor: str) -> CertRecord:
        """km's revoke request naming an issuing CA (``ca``) and nothing else to revoke."""
        if req.serial is not None or req.device_id is not None or req.decommission:
            raise BadRequestError("revoking an issuing CA takes only its name and a reason", field="ca")
        assert req.ca is not None
        return self.revoke_ca(req.ca, reason=req.reason, actor=actor)

    def revoked(self, records: list[CertRecord]) -> None:
        """After revocations (here or in another worker): drop cached answers, refresh delta CRLs
        (the root's full CRL for a revoked issuing CA: it has no delta)."""
        partitions = set()
        for rec in records:
            self.invalidate(rec.issuer, rec.serial)
            if rec.crl_partition is not None:
                partitions.add((rec.issuer, rec.crl_partition))
        for issuer, partition in sorted(partitions):
            # the revocation is done and recorded; a CRL that cannot be made now is made on schedule
            try:
                if issuer != ROOT:
                    self.generate_crl(issuer, partition, delta=True)
                elif self.root is not None:
                    self.generate_crl(ROOT, 0)
            except IotdlmError as exc:
                log.warning("delta CRL %s/%s not refreshed after a revocation: %s", issuer, partition, exc)

    def invalidate(self, issuer: str, serial: int) -> None:
        with self._lock:
            for alg in ("sha1", "sha256"):
                self._cache.pop((issuer, serial, alg), None)
            self._status.pop((issuer, serial), None)
            self._generation += 1

    # --- CRLs ---------------------------------------------------------------------------------
    def _ca(self, issuer: str) -> IssuingCA:
        if issuer == ROOT and self.root is not None:
            return self.root
        try:
            return self.cas[issuer]
        except KeyError:
            known = ", ".join(sorted([*self.cas, *([ROOT] if self.root is not None else [])]))
            raise NotFoundError(f"no CA {issuer!r} publishes CRLs here; known: {known}") from None

    def _crl_scopes(self) -> Iterator[tuple[str, int]]:
        """Every (issuer, partition) with a full CRL: each partition of each issuing CA, and the
        root's one CRL when this km holds the root key."""
        for issuer, ca in self.cas.items():
            if self._retired(ca):
                continue
            for partition in range(self.settings.urls.crl_partitions):
                yield issuer, partition
        if self.root is not None:
            yield ROOT, 0

    def _retired(self, ca: IssuingCA) -> bool:
        """A CA rotated out whose overlap is over and whose last certificate expired: no one can
        still need its CRLs, the schedule stops making them (ADR 0026)."""
        gen = ca.generation
        if gen is None or gen.active:
            return False
        last = self.store.last_expiry(ca.name, except_profile="ocsp")
        return gen.state(self.clock.now(), last) == CaState.RETIRED

    def _check_partition(self, partition: int, issuer: str = "", *, delta: bool = False) -> None:
        if issuer == ROOT:
            if partition != 0:
                raise NotFoundError(f"no CRL partition {partition} of the root CA; it publishes one CRL, partition 0")
            if delta:
                raise NotFoundError("the root CA publishes one full CRL (partition 0) and no delta CRL")
            return
        if not 0 <= partition < self.settings.urls.crl_partitions:
            raise NotFoundError(
                f"no CRL partition {partition}; partitions are 0..{self.settings.urls.crl_partitions - 1}"
            )

    def generate_crl(self, issuer: str, partition: int, *, delta: bool = False) -> CrlRecord:
        ca = self._ca(issuer)
        self._check_partition(partition, issuer, delta=delta)
        now = self.clock.now()
        base: CrlRecord | None = None
        if delta:
            base = self.store.get_crl(issuer, partition, "full") or self.generate_crl(issuer, partition)
        number = self.store.next_crl_number(issuer, partition)
        since = base.this_update - DELTA_OVERLAP if base is not None else None
        counted = [0]

        def entries() -> Iterator[pki_crl.RevokedEntry]:
            for s, at, reason in self.store.iter_revoked(
                issuer,
                partition,
                not_after_from=now,
                revoked_since=since,
                superseded_grace=self.settings.superseded_grace,
                as_of=now,
            ):
                counted[0] += 1
                yield pki_crl.RevokedEntry(serial=s, revoked_at=at, reason=_listed_reason(reason, s))

        validity = self.settings.delta_validity if delta else self.settings.crl_validity
        crl = pki_crl.build_crl(
            ca,
            entries(),
            number=number,
            this_update=now,
            next_update=now + validity,
            partition=partition,
            urls=self.settings.urls,
            delta_base=base.number if base is not None else None,
            ca_certs=issuer == ROOT,
        )
        rec = CrlRecord(
            issuer=issuer,
            partition=partition,
            kind="delta" if delta else "full",
            number=number,
            this_update=now,
            next_update=now + validity,
            base_number=base.number if base is not None else None,
            der=crl.public_bytes(Encoding.DER),
        )
        try:
            self.store.save_crl(
                rec,
                [
                    entry(
                        now,
                        fmt.CRL,
                        "km-va",
                        f"{issuer}/{partition}",
                        issuer=issuer,
                        partition=partition,
                        crl_kind=rec.kind,
                        number=number,
                        base_number=rec.base_number,
                        entries=counted[0],
                        next_update=rec.next_update.isoformat(),
                    )
                ],
            )
        except ConflictError:
            # another worker saved a newer CRL of this partition meanwhile: that one stands
            newer = self.store.get_crl(issuer, partition, rec.kind)
            if newer is None:
                raise
            return newer
        return rec

    def current_crl(self, issuer: str, partition: int, *, delta: bool = False) -> CrlRecord:
        """The stored CRL, made anew if there is none or it is past its next update."""
        self._ca(issuer)
        self._check_partition(partition, issuer, delta=delta)
        rec = self.store.get_crl(issuer, partition, "delta" if delta else "full")
        if rec is None or rec.next_update <= self.clock.now():
            rec = self.generate_crl(issuer, partition, delta=delta)
        return rec

    def refresh_due(self, *, margin: dt.timedelta = dt.timedelta(minutes=10)) -> int:
        """Regenerate every full CRL that is missing or due within ``margin`` (the schedule)."""
        now = self.clock.now()
        stored = {(r.issuer, r.partition): r for r in self.store.list_crls() if r.kind == "full"}
        n = 0
        for issuer, partition in self._crl_scopes():
            rec = stored.get((issuer, partition))
            if rec is None or rec.next_update - margin <= now:
                self.generate_crl(issuer, partition)
                n += 1
        return n

    def generate_all(self, *, delta: bool = False, progress: Callable[[], None] = lambda: None) -> list[CrlRecord]:
        out = []
        for issuer, partition in self._crl_scopes():
            if issuer == ROOT and delta:
                continue
            out.append(self.generate_crl(issuer, partition, delta=delta))
            progress()
        return out

    # --- OCSP ---------------------------------------------------------------------------------
    def responder(self, issuer: str) -> pki_ocsp.Responder:
        """The delegated OCSP responder of ``issuer``, issued (and recorded) on first use and
        renewed before it expires. Its key lives only in this worker's memory."""
        now = self.clock.now()
        r = self._responders.get(issuer)
        if r is not None and r.certificate.not_valid_after_utc - self.settings.responder_renew_before > now:
            return r
        with self._lock:
            r = self._responders.get(issuer)
            if r is not None and r.certificate.not_valid_after_utc - self.settings.responder_renew_before > now:
                return r
            ca = self._ca(issuer)
            profile = dataclasses.replace(self.profiles["ocsp"], issuer=ca.name)
            key = generate_key(ca.signer.algorithm)
            cert = ca.issue(
                profile,
                key.public_key(),
                x509.Name(
                    [
                        *ca.certificate.subject.get_attributes_for_oid(x509.oid.NameOID.ORGANIZATION_NAME),
                        x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, f"{issuer} OCSP responder"),
                    ]
                ),
                now=now,
                serial=x509.random_serial_number(),
            )
            self.store.add_certificates([record_for(cert, ca.name, "ocsp", None, "km-va", now)])
            r = pki_ocsp.Responder(ca=ca, certificate=cert, signer=KeySigner(key))
            self._responders[issuer] = r
            return r

    def ocsp(self, request_der: bytes) -> bytes:
        """Answer one OCSP request (DER). Never raises: bad input is malformedRequest, and any
        failure inside the VA (database, signing, a bug) is internalError, logged with its cause."""
        first = self.ocsp_cached(request_der)
        return first if isinstance(first, bytes) else self.answer(first)

    def ocsp_cached(self, request_der: bytes) -> bytes | pki_ocsp.OcspQuery:
        """The fast path, without the database: the answer when it is a cached pre-signed response
        or malformedRequest; otherwise the parsed query, for :meth:`answer` (nonce, cache miss).
        Never raises (see :meth:`ocsp`)."""
        try:
            return self._ocsp_cached(request_der)
        except Exception:  # RFC 6960 4.2.1: any failure is an internalError response
            log.exception("OCSP request not answered: internal error")
            return pki_ocsp.error_response("internal_error")

    def _ocsp_cached(self, request_der: bytes) -> bytes | pki_ocsp.OcspQuery:
        try:
            query = pki_ocsp.parse_request(request_der)
        except IotdlmError:
            return pki_ocsp.error_response("malformed_request")
        if query.nonce is None:
            for issuer, responder in self._responders.items():
                if responder.matches(query):
                    with self._lock:
                        hit = self._cache.get((issuer, query.serial, query.hash_algorithm))
                    if hit is not None and hit[1] > self.clock.now():
                        return hit[0]
                    break
        return query

    def answer(self, query: pki_ocsp.OcspQuery) -> bytes:
        """Sign an answer for a parsed query (reads the certificate's status from the store).
        Never raises: a failure (the database is down, signing fails, a bug) is logged with its
        cause and answered ``internalError`` (RFC 6960 4.2.1), which relying parties take as
        "ask again" -- never an error reply that cm would turn into HTTP 500."""
        try:
            issuer = self._issuer_for(query)
            if issuer is None:
                return pki_ocsp.error_response("unauthorized")
            return self._sign_response(issuer, query)
        except Exception:  # RFC 6960 4.2.1: any failure is an internalError response
            log.exception("OCSP request for serial %x answered internalError", query.serial)
            return pki_ocsp.error_response("internal_error")

    def _issuer_for(self, query: pki_ocsp.OcspQuery) -> str | None:
        for name in self.cas:
            if self.responder(name).matches(query):
                return name
        return None

    def _sign_response(self, issuer: str, query: pki_ocsp.OcspQuery) -> bytes:
        now = self.clock.now()
        rec, read_until = self._certificate_status(issuer, query.serial, now)
        next_update = now + self.settings.ocsp_validity
        # a good answer may be cached only as long as no supersession can have taken effect
        cache_until = min(next_update, now + self.settings.superseded_grace)
        if read_until is not None:  # a kept row: a supersession since it was read takes effect no sooner
            next_update = min(next_update, read_until)
            cache_until = min(cache_until, read_until)
        if rec is None:
            status = pki_ocsp.CertStatus("unknown")
        elif rec[0] == "revoked":
            revoked_at = rec[1] if rec[1] is not None else now
            status = pki_ocsp.CertStatus("revoked", revoked_at=revoked_at, reason=_listed_reason(rec[2], query.serial))
            cache_until = next_update
        elif rec[0] == "superseded" and rec[1] is not None:
            effective = rec[1] + self.settings.superseded_grace
            if effective <= now:
                status = pki_ocsp.CertStatus("revoked", revoked_at=effective, reason="superseded")
                cache_until = next_update
            else:  # still in its grace: good, and to be asked again when the grace ends
                status = pki_ocsp.CertStatus("good")
                next_update = cache_until = min(next_update, effective)
        else:
            status = pki_ocsp.CertStatus("good")
        der = pki_ocsp.build_response(
            self.responder(issuer),
            query,
            status,
            this_update=now,
            next_update=next_update,
            include_nonce=query.nonce is not None,
        )
        if query.nonce is None and rec is not None:
            with self._lock:
                self._cache[(issuer, query.serial, query.hash_algorithm)] = (der, cache_until)
                if len(self._cache) > self.settings.cache_size:
                    self._cache.popitem(last=False)
        return der

    def _certificate_status(
        self, issuer: str, serial: int, now: dt.datetime
    ) -> tuple[_Status | None, dt.datetime | None]:
        """The store's status row, kept as long as a pre-signed answer from it would be: dropped at
        once by a revocation (:meth:`invalidate`), and no longer than the superseded grace (a
        supersession changes the row without an event, and takes effect only after the grace).
        Unknown certificates are always read again (one may be issued a moment later). Returns the
        row and, when it was kept, until when: a good answer from it says nextUpdate no later (a
        supersession after the read takes effect a grace after it, no sooner)."""
        key = (issuer, serial)
        with self._lock:
            hit = self._status.get(key)
            generation = self._generation
        if hit is not None and hit[1] > now:
            return hit
        rec = self.store.certificate_status(issuer, serial)
        keep = min(self.settings.ocsp_validity, self.settings.superseded_grace)
        if rec is not None and keep > dt.timedelta(0):
            with self._lock:
                if generation != self._generation:  # revoked meanwhile: read again next time
                    return rec, None
                self._status[key] = (rec, now + keep)
                self._status.move_to_end(key)
                if len(self._status) > self.settings.cache_size:
                    self._status.popitem(last=False)
        return rec, None


#: (status, revoked_at, revocation reason) of a certificate, as the store reads it
_Status = tuple[str, dt.datetime | None, str | None]


def ca_record(cert: x509.Certificate, actor: str, now: dt.datetime) -> CertRecord:
    """The store record of an issuing-CA certificate: issuer ``root``, profile ``ca``, on the
    root's one CRL (partition 0)."""
    return record_for(cert, ROOT, CA_PROFILE, None, actor, now, crl_partition=0)


def _listed_reason(reason: str | None, serial: int) -> str | None:
    """The reason a stored revocation is published with. A removeFromCRL stored before it was
    refused (RFC 5280 5.3.1 allows it in delta CRLs only) is published as no reason: the
    certificate stays revoked, and the CRL and the OCSP answer can still be made."""
    if reason is not None and reason.replace("_", "").lower() == "removefromcrl":
        log.warning("certificate %x was revoked with removeFromCRL; published without a reason", serial)
        return None
    return reason
