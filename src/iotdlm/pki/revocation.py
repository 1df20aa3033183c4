"""Is a signer's certificate revoked? The service CA's CRLs, as far as this process has seen them.

km's signed replies (ADR 0006) and the supervisor's signed mode record are trusted for the
certificate that signed them. A stolen key is answered by revoking its certificate; the
verifiers check the signer against the service CA's CRLs (the full CRL and the delta CRL of the
certificate's partition, which km makes anew at every revocation). Pure: the I/O shell fetches
the CRLs (:func:`iotdlm.client.revocation.refresh`) and hands the bytes to :meth:`ServiceCrls.add`;
:meth:`ServiceCrls.check` is synchronous.

Rules:

- a CRL counts only if the service CA signed it and its issuing distribution point names the
  partition it was asked for (a CRL of another partition cannot stand in for it);
- a serial listed on any CRL this process accepted stays revoked (revocation is final: an old
  CRL replayed later cannot un-revoke it);
- a partition's CRLs are fetched again once past their nextUpdate, and at most every
  ``retry_after`` when fetching fails.

Not covered (soft-fail, said in docs/operations.md section 12): when no CRL can be fetched --
km is off in provisioning-software and software-management, or a rogue responder withholds
it -- the signer is accepted on its chain alone; an attacker who answers for km can also replay
the last CRL before the revocation until its nextUpdate (1 hour for a delta CRL).
"""

from __future__ import annotations

import datetime as dt
import re
import threading
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from iotdlm.errors import BadSignatureError, RevokedSignerError, UntrustedError
from iotdlm.pki.ca import crl_partition

#: the CRL of a partition: full or delta (both name the full CRL's URL as their distribution point)
_PARTITION_URL = re.compile(r"/crl/([A-Za-z0-9_-]+)/(\d+)\.(crl|delta)$")
#: a CRL larger than this is refused (km's are far below: see iotdlm.pki.crl.max_entries_for)
MAX_CRL_BYTES = 4 << 20


@dataclass
class _Seen:
    next_update: dt.datetime | None = None
    number: int = -1
    tried_at: dt.datetime | None = None


def _partition_of_url(url: str, issuer: str) -> int | None:
    m = _PARTITION_URL.search(url)
    if m is None or m.group(1) != issuer:
        return None
    return int(m.group(2))


class ServiceCrls:
    """The revoked serials of the service CA (``issuer`` is its name in CRL URLs, ``service``).

    ``partitions`` is the deployment's ``crl_partitions``: the partition of a certificate that
    names no CRL distribution point (``serial % partitions``).
    """

    def __init__(
        self,
        service_ca: x509.Certificate,
        *,
        partitions: int,
        issuer: str = "service",
        retry_after: dt.timedelta = dt.timedelta(seconds=60),
    ) -> None:
        if partitions < 1:
            raise ValueError("partitions must be positive")
        self.service_ca = service_ca
        self.issuer = issuer
        self._partitions = partitions
        self._retry_after = retry_after
        self._revoked: set[int] = set()
        self._seen: dict[tuple[int, bool], _Seen] = {}
        self._lock = threading.Lock()

    def partition_of(self, cert: x509.Certificate) -> int:
        """The CRL partition of ``cert``: from its CRL distribution point, else from its serial."""
        try:
            cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        except x509.ExtensionNotFound:
            return crl_partition(cert.serial_number, self._partitions)
        for point in cdp:
            for name in point.full_name or ():
                if isinstance(name, x509.UniformResourceIdentifier):
                    found = _partition_of_url(name.value, self.issuer)
                    if found is not None:
                        return found
        return crl_partition(cert.serial_number, self._partitions)

    def wanted(self, cert: x509.Certificate, now: dt.datetime) -> list[tuple[int, bool]]:
        """The (partition, delta) CRLs to fetch before checking ``cert`` at ``now``: never seen or
        past their nextUpdate, and not tried within ``retry_after``."""
        partition = self.partition_of(cert)
        out = []
        with self._lock:
            for delta in (False, True):
                seen = self._seen.get((partition, delta), _Seen())
                fresh = seen.next_update is not None and now < seen.next_update
                recently = seen.tried_at is not None and now - seen.tried_at < self._retry_after
                if not fresh and not recently:
                    out.append((partition, delta))
        return out

    def tried(self, partition: int, delta: bool, now: dt.datetime) -> None:
        """A fetch of this CRL was attempted at ``now`` (successful or not)."""
        with self._lock:
            self._seen.setdefault((partition, delta), _Seen()).tried_at = now

    def add(self, data: bytes, partition: int, *, delta: bool) -> None:
        """Accept a CRL fetched for ``partition`` (``delta``: the delta CRL); RejectedError if it
        is not the service CA's CRL of that partition."""
        if len(data) > MAX_CRL_BYTES:
            raise UntrustedError(f"the CRL is {len(data)} bytes, over the limit of {MAX_CRL_BYTES}")
        try:
            crl = x509.load_der_x509_crl(data)
        except ValueError as exc:
            raise UntrustedError("the CRL is not a DER CertificateRevocationList") from exc
        if crl.issuer != self.service_ca.subject:
            raise UntrustedError(f"the CRL is issued by {crl.issuer.rfc4514_string()}, not by the service CA")
        try:
            ok = crl.is_signature_valid(self.service_ca.public_key())  # type: ignore[arg-type]
        except (InvalidSignature, TypeError, ValueError):
            ok = False
        if not ok:
            raise BadSignatureError("the CRL's signature does not verify with the service CA's key")
        ext = crl.extensions
        try:
            idp = ext.get_extension_for_class(x509.IssuingDistributionPoint).value
        except x509.ExtensionNotFound:
            raise UntrustedError("the CRL names no issuing distribution point (partition)") from None
        named = {
            _partition_of_url(n.value, self.issuer)
            for n in idp.full_name or ()
            if isinstance(n, x509.UniformResourceIdentifier)
        }
        if named != {partition}:
            raise UntrustedError(f"the CRL is not the one of partition {partition} of the {self.issuer} CA")
        try:
            ext.get_extension_for_class(x509.DeltaCRLIndicator)
            is_delta = True
        except x509.ExtensionNotFound:
            is_delta = False
        if is_delta != delta:
            sent, asked = ("delta", "full") if is_delta else ("full", "delta")
            raise UntrustedError(f"a {sent} CRL was sent where the {asked} CRL was asked for")
        try:
            number = ext.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            raise UntrustedError("the CRL has no CRL number") from None
        listed = set()
        for entry in crl:
            try:
                reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
            except x509.ExtensionNotFound:
                reason = None
            if reason is not x509.ReasonFlags.remove_from_crl:
                listed.add(entry.serial_number)
        with self._lock:
            self._revoked |= listed  # final: never forgotten
            seen = self._seen.setdefault((partition, delta), _Seen())
            if number >= seen.number:
                seen.number = number
                seen.next_update = crl.next_update_utc

    def check(self, cert: x509.Certificate) -> None:
        """Raise RevokedSignerError if ``cert`` (issued by the service CA) is on a CRL seen here."""
        if cert.issuer != self.service_ca.subject:
            return  # not ours to judge: the chain check refuses it
        with self._lock:
            revoked = cert.serial_number in self._revoked
        if revoked:
            raise RevokedSignerError(
                f"the signer certificate {cert.subject.rfc4514_string()} (serial {cert.serial_number:x}) "
                "is revoked (service CA's CRL)"
            )


__all__ = ["MAX_CRL_BYTES", "RevokedSignerError", "ServiceCrls"]
