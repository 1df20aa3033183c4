"""Who signed a request to km (steps 1 and 2 of :mod:`iotdlm.km.core`): the JWS's x5c leaf, checked
up to this deployment's service CA (an iotdlm module) or operational CA (a device), cached by
fingerprint in each km worker. A principal's first authenticated request at a worker is the audit
log's "login"."""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.oid import ExtendedKeyUsageOID

from iotdlm.errors import UntrustedError
from iotdlm.km.audit import entry
from iotdlm.km.ra import ModulePrincipal
from iotdlm.km.storage import KmStore
from iotdlm.pki.ca import IssuingCA, cas_of
from iotdlm.pki.chain import load_certificate, verify_issued_by
from iotdlm.pki.keys import check_public_key
from iotdlm.pki.names import device_id_of, module_of
from iotdlm.wire import audit as fmt
from iotdlm.wire import envelope


@dataclass(frozen=True)
class TrustedSigner:
    """A request signer's certificate, checked, and who it is."""

    certificate: x509.Certificate
    key: envelope.JoseKey
    kind: str  # "module" | "device"
    module: ModulePrincipal | None
    device_id: str | None
    issuer: str


class SignerCache:
    """The request signers a km worker has checked, by certificate fingerprint."""

    def __init__(self, cas: dict[str, IssuingCA], store: KmStore) -> None:
        self.cas = cas
        self.store = store
        self._trusted: dict[str, TrustedSigner] = {}
        self._lock = threading.Lock()

    def trust(self, leaf_der: bytes, now: dt.datetime) -> TrustedSigner:
        fp = hashlib.sha256(leaf_der).hexdigest()
        cached = self._trusted.get(fp)
        if cached is not None and cached.certificate.not_valid_after_utc >= now:
            return cached
        try:
            trusted = self._check_signer(load_certificate(leaf_der), fp, now)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            # cryptography parses extensions lazily: a malformed one surfaces here
            raise UntrustedError(
                "request signer certificate is malformed (an extension or field cryptography cannot read)"
            ) from exc
        with self._lock:
            if len(self._trusted) > 10_000:
                self._trusted.clear()
            first = fp not in self._trusted
            self._trusted[fp] = trusted
        if first:
            # a principal's first authenticated request at this worker: the audit log's "login"
            who = trusted.module.describe() if trusted.module is not None else f"device {trusted.device_id}"
            self.store.append_audit(
                [
                    entry(
                        now,
                        fmt.LOGIN,
                        who,
                        trusted.certificate.subject.rfc4514_string()[:1000],
                        fingerprint=fp,
                        signer_kind=trusted.kind,
                        issuer=trusted.issuer,
                    )
                ]
            )
        return trusted

    def _check_signer(self, cert: x509.Certificate, fp: str, now: dt.datetime) -> TrustedSigner:
        trusted: TrustedSigner | None = None
        # every generation of a CA (ADR 0026): certificates of one rotated out stay good until they expire
        service = next((ca for ca in cas_of(self.cas, ("service",)) if cert.issuer == ca.certificate.subject), None)
        operational = next(
            (ca for ca in cas_of(self.cas, ("operational",)) if cert.issuer == ca.certificate.subject), None
        )
        if service is not None:
            verify_issued_by(cert, service.certificate, now=now, eku=ExtendedKeyUsageOID.CLIENT_AUTH)
            ident = module_of(cert)
            if ident is None:
                raise UntrustedError("service certificate names no iotdlm module")
            module, dtype = ident
            trusted = TrustedSigner(
                certificate=cert,
                key=envelope.jose_key(check_public_key(cert.public_key())),
                kind="module",
                module=ModulePrincipal(module=module, dtype=dtype, fingerprint=fp),
                device_id=None,
                issuer="service",
            )
        elif operational is not None:
            verify_issued_by(cert, operational.certificate, now=now, eku=ExtendedKeyUsageOID.CLIENT_AUTH)
            device_id = device_id_of(cert)
            if device_id is None:
                raise UntrustedError("device certificate names no device id")
            trusted = TrustedSigner(
                certificate=cert,
                key=envelope.jose_key(check_public_key(cert.public_key())),
                kind="device",
                module=None,
                device_id=device_id,
                issuer="operational",
            )
        if trusted is None:
            raise UntrustedError(
                f"request signer {cert.subject.rfc4514_string()} is not issued by this deployment's service "
                "or operational CA"
            )
        return trusted
