"""km's registry of EXTERNAL factory certificates (seed 003 VI-B and VII-C).

A CA that is not the one that issued a fleet's factory certificates learns which devices may
enroll with it from the provider that operates them: "SP1 ... needs to share the factory
certificates. A proposed format with minimal overhead is x5bag ... In return, the SP1 is given the
URI which the IoT devices should contact for doing the enrollment". In trust transfer SP2 does the
same with CA2 (VII-C): it forwards the x5bag from the UpdateInfoList and gets the CA-URI back.

- :meth:`FactoryRegistry.register_cas` -- the operator registers the permanent CA that issued the
  factory certificates (its root as an anchor; issuing CAs chain to a registered anchor). Which
  external CA to trust is the operator's decision, never taken from a device or a bag alone.
- :meth:`FactoryRegistry.register` -- an x5bag of factory certificates. Each must chain to a
  registered anchor, be valid now, allow TLS client authentication, and name a device (URI SAN
  ``urn:dev:org:<PEN>-<id>`` or the legacy ``urn:iotdlm:device:<id>``, else subject serialNumber,
  else CN). CA certificates in the bag are
  registered too when they chain to a registered anchor. The certificates, the devices they name
  (so km's RA knows them: dtype, retired or not) and an audit record go in one transaction.
  Returns the enrollment URI (CA-URI).
- :meth:`FactoryRegistry.presented` -- what :meth:`iotdlm.km.core.Km.presented` asks when a device
  shows a factory certificate that is not from this deployment's own factory CA: accepted ONLY if
  that exact certificate (by SHA-256 fingerprint) is registered, not withdrawn, issued by a
  registered CA, valid now, within its agreed enrollment window if one was given. Every other
  external certificate is refused -- including one from the same permanent CA for a device that
  was not in the UpdateInfoList.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iotdlm.clock import Clock
from iotdlm.errors import BadRequestError, NotAuthorizedError, UntrustedError
from iotdlm.km.ra import PresentedCredential
from iotdlm.km.storage import RegistryStore
from iotdlm.pki.chain import der, verify_issued_by
from iotdlm.pki.names import check_id
from iotdlm.store import AuditEntry
from iotdlm.store.transfer import (
    FACTORY_REGISTERED,
    FACTORY_WITHDRAWN,
    FactoryCaRecord,
    FactoryRecord,
)
from iotdlm.transfer.messages import decode_x5bag
from iotdlm.transfer.trust import factory_device_id
from iotdlm.wire import audit as fmt

#: the issuer name km gives external factory certificates (PresentedCredential.issuer)
EXTERNAL_ISSUER = "external"
#: audit kind of a registration
REGISTRATION_KIND = fmt.REGISTRATION
MAX_DEPTH = 4


@dataclass(frozen=True)
class Registration:
    enroll_uri: str
    batch: str
    devices: tuple[str, ...]
    cas: tuple[str, ...]


def _fp(cert: x509.Certificate) -> str:
    return hashlib.sha256(der(cert)).hexdigest()


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except Exception:  # InvalidSignature, ValueError, TypeError
        return False
    return True


def _dtype_of(cert: x509.Certificate) -> str | None:
    """Our factory certificates carry the dtype as OU (pki.names.device_subject)."""
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not units or not isinstance(units[0].value, str):
        return None
    try:
        return check_id(units[0].value, "dtype")
    except BadRequestError:
        return None


class FactoryRegistry:
    """The registry on one km store. Thread-safe; CA certificates are cached after first use."""

    def __init__(self, store: RegistryStore, clock: Clock, *, enroll_uri: str | None = None) -> None:
        self.store = store
        self.tables = store
        self.clock = clock
        self.enroll_uri = enroll_uri
        self._cas: dict[str, tuple[x509.Certificate, bool]] | None = None
        self._lock = threading.Lock()

    # --- CAs --------------------------------------------------------------------------------
    def _load_cas(self, *, refresh: bool = False) -> dict[str, tuple[x509.Certificate, bool]]:
        with self._lock:
            if self._cas is None or refresh:
                self._cas = {
                    rec.fingerprint: (x509.load_der_x509_certificate(rec.der), rec.anchor)
                    for rec in self.tables.factory_cas()
                }
            return self._cas

    def client_cas(self) -> list[x509.Certificate]:
        """The registered external CA certificates: what cm's TLS must accept client certificates
        from (``server_tls_context(client_cas=...)``) for registered devices to reach km."""
        return [cert for cert, _anchor in self._load_cas(refresh=True).values()]

    def _chain_ok(
        self, cert: x509.Certificate, pool: Mapping[str, tuple[x509.Certificate, bool]], now: dt.datetime
    ) -> str:
        """Fingerprint of the registered CA that issued ``cert``, after checking the path from it
        up to a registered anchor; UntrustedError otherwise."""
        current = cert
        issuer_fp: str | None = None
        for _ in range(MAX_DEPTH):
            step = None
            for fp, (ca, anchor) in pool.items():
                if ca.subject == current.issuer and _verifies(current, ca):
                    step = (fp, ca, anchor)
                    break
            if step is None:
                raise UntrustedError(
                    f"certificate {current.subject.rfc4514_string()} is not issued by a registered factory CA"
                )
            fp, ca, anchor = step
            if issuer_fp is None:
                issuer_fp = fp
            if not (ca.not_valid_before_utc <= now <= ca.not_valid_after_utc):
                raise UntrustedError(f"factory CA {ca.subject.rfc4514_string()} is not valid now")
            if anchor:
                return issuer_fp
            current = ca
        raise UntrustedError("the factory CA chain is too long")

    def register_cas(self, certs: Sequence[x509.Certificate], *, actor: str) -> list[str]:
        """Register the permanent CA: self-signed CA certificates become anchors; the others must
        chain to an anchor (registered before, or in ``certs``). Returns their fingerprints."""
        now = self.clock.now()
        pool = dict(self._load_cas(refresh=True))
        records: list[FactoryCaRecord] = []
        pending = [c for c in certs if _is_ca(c)]
        if len(pending) != len(certs):
            raise BadRequestError("register_cas takes CA certificates only (basicConstraints cA)")
        for c in sorted(pending, key=lambda c: not _self_signed(c)):
            fp = _fp(c)
            anchor = _self_signed(c)
            if not anchor:
                self._chain_ok(c, pool, now)
            pool[fp] = (c, anchor)
            records.append(_ca_record(c, anchor, actor, now))
        audit = [
            a
            for r in records
            for a in _audit(now, actor, f"factory-ca:{r.fingerprint[:16]}", subject=r.subject, anchor=r.anchor)
        ]
        self.tables.register_factory(records, [], audit=audit, now=now)
        self._load_cas(refresh=True)
        return [r.fingerprint for r in records]

    # --- factory certificates ------------------------------------------------------------------
    def register(
        self,
        x5bag: bytes,
        *,
        actor: str,
        batch: str,
        windows: Mapping[str, tuple[dt.datetime, dt.datetime]] | None = None,
        dtype: str | None = None,
    ) -> Registration:
        """Register the factory certificates of an x5bag (all or nothing). ``windows``: the agreed
        enrollment window per device id; ``dtype`` for devices whose certificate names none."""
        if self.enroll_uri is None:
            raise RuntimeError("this registry has no enrollment URI configured")
        if dtype is not None:
            check_id(dtype, "dtype")
        check_id(batch, "batch")
        now = self.clock.now()
        certs = decode_x5bag(x5bag)
        pool = dict(self._load_cas(refresh=True))
        if not any(anchor for _c, anchor in pool.values()):
            raise NotAuthorizedError("no factory CA is registered: register the permanent CA first (register_cas)")
        cas: list[FactoryCaRecord] = []
        for c in certs:
            if _is_ca(c) and _fp(c) not in pool:
                self._chain_ok(c, pool, now)
                pool[_fp(c)] = (c, False)
                cas.append(_ca_record(c, False, actor, now))
        records: list[FactoryRecord] = []
        added: list[tuple[str, str]] = []
        seen: set[str] = set()
        for c in certs:
            if _is_ca(c):
                continue
            device_id = factory_device_id(c)
            if device_id in seen:
                raise BadRequestError(f"device {device_id} appears twice in the x5bag", device_id=device_id)
            seen.add(device_id)
            issuer_fp = self._chain_ok(c, pool, now)  # signatures up to an anchor checked here
            _check_leaf(c, device_id, now)
            window = (windows or {}).get(device_id)
            records.append(
                FactoryRecord(
                    fingerprint=_fp(c),
                    device_id=device_id,
                    issuer_fingerprint=issuer_fp,
                    serial_hex=format(c.serial_number, "x"),
                    not_after=c.not_valid_after_utc,
                    status=FACTORY_REGISTERED,
                    batch=batch,
                    der=der(c),
                    registered_by=actor,
                    registered_at=now,
                    enroll_not_before=window[0] if window else None,
                    enroll_not_after=window[1] if window else None,
                )
            )
            added.append((device_id, dtype or _dtype_of(c) or "external"))
        if not records:
            raise BadRequestError("the x5bag holds no factory (end-entity) certificate")
        audit = _audit(
            now, actor, f"factory-batch:{batch}", batch=batch, devices=len(records), enroll_uri=self.enroll_uri
        )
        self.tables.register_factory(cas, records, devices_to_add=added, audit=audit, now=now)
        if cas:
            self._load_cas(refresh=True)
        return Registration(
            enroll_uri=self.enroll_uri,
            batch=batch,
            devices=tuple(r.device_id for r in records),
            cas=tuple(c.fingerprint for c in cas),
        )

    def withdraw(self, batch: str) -> int:
        """Withdraw a batch: its devices can no longer enroll with their factory certificates."""
        recs = self.tables.list_factory(batch=batch, limit=100_000)
        return self.tables.set_factory_status([r.fingerprint for r in recs], FACTORY_WITHDRAWN)

    def lookup(self, cert: x509.Certificate) -> FactoryRecord | None:
        """The registration of this exact certificate (whatever its status now), or None."""
        return self.tables.get_factory(_fp(cert))

    def presented(
        self, cert: x509.Certificate, now: dt.datetime, *, record: FactoryRecord | None = None
    ) -> PresentedCredential:
        """Km.presented for a certificate from outside this deployment's CAs: registered or refused.
        ``record``: its registration, when the caller looked it up already."""
        rec = record if record is not None else self.lookup(cert)
        if rec is None:
            raise UntrustedError(
                f"client certificate {cert.subject.rfc4514_string()} is neither from this deployment's CAs nor a "
                "factory certificate registered with this CA (shared in an UpdateInfoList)"
            )
        pool = self._load_cas()
        ca = pool.get(rec.issuer_fingerprint) or self._load_cas(refresh=True).get(rec.issuer_fingerprint)
        if ca is None:
            raise UntrustedError(f"the factory CA of device {rec.device_id} is no longer registered")
        verify_issued_by(cert, ca[0], now=now, eku=ExtendedKeyUsageOID.CLIENT_AUTH)
        if rec.enroll_not_before is not None and now < rec.enroll_not_before:
            raise NotAuthorizedError(
                f"device {rec.device_id} may enroll from {rec.enroll_not_before.isoformat()} on",
                device_id=rec.device_id,
            )
        if rec.enroll_not_after is not None and now > rec.enroll_not_after:
            raise NotAuthorizedError(
                f"the enrollment window of device {rec.device_id} closed at {rec.enroll_not_after.isoformat()}",
                device_id=rec.device_id,
            )
        status = "valid" if rec.status == FACTORY_REGISTERED else "revoked"
        return PresentedCredential(
            profile="factory",
            device_id=rec.device_id,
            status=status,
            issuer=EXTERNAL_ISSUER,
            serial=cert.serial_number,
        )


def _check_leaf(cert: x509.Certificate, device_id: str, now: dt.datetime) -> None:
    """Valid now and good for TLS client authentication (its signature is checked by the caller)."""
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise UntrustedError(f"the factory certificate of device {device_id} is not valid now", device_id=device_id)
    try:
        ekus = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return  # no EKU: any use (RFC 5280 4.2.1.12)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UntrustedError(
            f"factory certificate of device {device_id} has a malformed extended key usage extension"
        ) from exc
    if ExtendedKeyUsageOID.CLIENT_AUTH not in ekus:
        raise UntrustedError(
            f"the factory certificate of device {device_id} does not allow TLS client authentication",
            device_id=device_id,
        )


def _verifies(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # InvalidSignature, ValueError, TypeError
        return False
    return True


def _ca_record(cert: x509.Certificate, anchor: bool, actor: str, now: dt.datetime) -> FactoryCaRecord:
    return FactoryCaRecord(
        fingerprint=_fp(cert),
        subject=cert.subject.rfc4514_string(),
        anchor=anchor,
        not_after=cert.not_valid_after_utc,
        der=der(cert),
        registered_by=actor,
        registered_at=now,
    )


def _audit(now: dt.datetime, actor: str, target: str, **data: object) -> list[AuditEntry]:
    """Every registration enters the hash-chained audit log, in the registering transaction."""
    return [AuditEntry(at=now, kind=fmt.REGISTRATION, actor=actor, subject=target, data=dict(data))]


__all__ = ["EXTERNAL_ISSUER", "REGISTRATION_KIND", "FactoryRegistry", "Registration"]
