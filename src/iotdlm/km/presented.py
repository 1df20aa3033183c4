"""The certificate a device presented at cm's TLS edge, checked by km itself (EST, ADR 0008).

Issued by this deployment's factory or operational CA, valid now, good for TLS client
authentication and recorded by km -- or an external factory certificate registered from an
x5bag (seed 003 VII-C). Its registration, its record and its device are read in ONE store
transaction per request, so a revocation, a withdrawn registration or a decommissioned device is
seen at once. What cannot change for given certificate bytes (the CA's signature on them, the
extended key usage, the device id they name) is checked once per certificate and remembered by
fingerprint in each km worker (issue 15); the validity window is checked against every request's
time.
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.oid import ExtendedKeyUsageOID

from iotdlm.errors import UntrustedError
from iotdlm.km.ra import PresentedCredential
from iotdlm.km.registry import FactoryRegistry
from iotdlm.km.storage import KmStore
from iotdlm.pki.ca import IssuingCA, cas_of, fingerprint
from iotdlm.pki.chain import load_certificate, verify_issued_by
from iotdlm.pki.names import device_id_of
from iotdlm.store import DeviceRecord

#: this deployment's CAs whose certificates a device may present
_OWN_CAS = ("factory", "operational")
#: how many checked certificates a worker remembers (then it starts over)
MAX_REMEMBERED = 10_000


@dataclass(frozen=True, slots=True)
class _Checked:
    """A certificate whose CA signature and extended key usage were checked."""

    ca: str
    device_id: str | None
    not_before: dt.datetime
    not_after: dt.datetime


class PresentedCheck:
    """:meth:`check` a presented certificate; see the module docstring."""

    def __init__(self, cas: dict[str, IssuingCA], store: KmStore, registry: FactoryRegistry) -> None:
        self.cas = cas
        self.store = store
        self.registry = registry
        self._checked: dict[str, _Checked] = {}
        self._lock = threading.Lock()

    def check(self, der_cert: bytes, now: dt.datetime) -> tuple[PresentedCredential, DeviceRecord | None]:
        """The credential, as km's store knows it now, and the store's record of its device (None
        if unknown). Raises UntrustedError (or NotAuthorizedError for a registration's window)."""
        try:
            cert = load_certificate(der_cert)
            fp = fingerprint(cert)
            seen = self._checked.get(fp)
            rows = self.store.presented_rows(fp, seen.device_id if seen is not None else _device_id_guess(cert))
            if rows.factory is not None:
                cred = self.registry.presented(cert, now, record=rows.factory)
                device = rows.device if rows.device is not None and rows.device.device_id == cred.device_id else None
                return cred, device if device is not None else self.store.get_device(cred.device_id)
            if seen is None or not seen.not_before <= now <= seen.not_after:
                seen = self._verify(cert, fp, now)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise UntrustedError(
                "client certificate is malformed (an extension or field cryptography cannot read)"
            ) from exc
        if seen.device_id is None:
            raise UntrustedError("client certificate names no device id")
        record = rows.certificate
        if record is None:
            raise UntrustedError(f"the {seen.ca} certificate of device {seen.device_id} is not registered with km")
        cred = PresentedCredential(
            profile=record.profile,
            device_id=seen.device_id,
            status=record.status,
            issuer=record.issuer,
            serial=record.serial,
        )
        device = rows.device if rows.device is not None and rows.device.device_id == seen.device_id else None
        return cred, device

    def _verify(self, cert: x509.Certificate, fp: str, now: dt.datetime) -> _Checked:
        for ca in cas_of(self.cas, _OWN_CAS):  # rotated-out generations too (ADR 0026)
            if cert.issuer == ca.certificate.subject:
                verify_issued_by(cert, ca.certificate, now=now, eku=ExtendedKeyUsageOID.CLIENT_AUTH)
                checked = _Checked(ca.role, device_id_of(cert), cert.not_valid_before_utc, cert.not_valid_after_utc)
                with self._lock:
                    if len(self._checked) >= MAX_REMEMBERED:
                        self._checked.clear()
                    self._checked[fp] = checked
                return checked
        raise UntrustedError(
            f"client certificate {cert.subject.rfc4514_string()} is not from this deployment's factory "
            "or operational CA, nor a factory certificate registered with it (shared in an UpdateInfoList)"
        )


def _device_id_guess(cert: x509.Certificate) -> str | None:
    """The device id the certificate names, to read its device with it (None if it names none or
    cannot be read: the checks that follow say why)."""
    try:
        return device_id_of(cert)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
