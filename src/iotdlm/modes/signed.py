"""The mode record is signed by the supervisor (the ``modes`` identity), and every reader checks it
(issue 11).

Only the supervisor's NATS login may write the mode bucket, but a record is trusted for what it
carries, not for where it was found: a value that reached the bucket another way (a rewritten
stream, a stolen login, an old unsigned record) must not set the mode. The value of key ``mode``
is a signed envelope (:mod:`iotdlm.wire.envelope`: a JWS with the signer's certificate in
``x5c``), operation ``mode``, audience ``iotdlm`` (every service), body the
:class:`~iotdlm.wire.modes.ModeRecord`.

A reader accepts it only when the signer's certificate was issued by the deployment's service CA,
is valid now, names the ``modes`` module (its URI SAN) and is not on the service CA's CRL (as far
as the reader has seen it: :mod:`iotdlm.pki.revocation`; the guard fetches it from km's VA), and
the signature verifies. The
envelope's time window does not apply: a mode stays in force until the next switch, however long
ago it was signed. Replaying an older genuine record needs a write to the bucket, which only the
supervisor's login has.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

import msgspec
from cryptography import x509

from iotdlm import errors
from iotdlm.bus import subjects
from iotdlm.bus.api import Bus
from iotdlm.client import revocation
from iotdlm.clock import Clock, SystemClock
from iotdlm.modes.table import Mode
from iotdlm.pki.chain import load_certificate, verify_issued_by
from iotdlm.pki.names import module_of
from iotdlm.pki.revocation import RevokedSignerError, ServiceCrls
from iotdlm.wire import envelope
from iotdlm.wire.modes import ModeRecord

if TYPE_CHECKING:
    from iotdlm.deployment import Deployment

OP = "mode"
AUDIENCE = "iotdlm"
#: a mode record does not expire: it holds until the supervisor writes the next one
_FOREVER = dt.timedelta(days=100 * 366)


def seal_record(sealer: envelope.Sealer, record: ModeRecord, *, now: dt.datetime) -> bytes:
    """The bucket value for ``record``, signed as the supervisor."""
    return sealer.seal(OP, msgspec.to_builtins(record), aud=AUDIENCE, now=now)


class ModeVerifier:
    """Checks a bucket value: signed by the ``modes`` identity under ``service_ca``, valid at the
    clock's now. :meth:`verify` returns the record or raises a RejectedError saying why not."""

    def __init__(self, service_ca: x509.Certificate, clock: Clock, *, crls: ServiceCrls | None = None) -> None:
        self._ca = service_ca
        self._clock = clock
        #: the service CA's CRLs: a revoked supervisor certificate is refused (None: not checked)
        self.crls = crls

    @classmethod
    def for_deployment(cls, dep: Deployment, clock: Clock | None = None) -> ModeVerifier:
        """The verifier of ``dep``: its service CA and its CRLs, the system clock by default."""
        ca = dep.ca_certificate("service")
        return cls(ca, clock or SystemClock(), crls=ServiceCrls(ca, partitions=dep.config.crl_partitions))

    def signer(self, value: bytes) -> x509.Certificate | None:
        """The certificate a bucket value says it is signed with (unchecked), if it names one."""
        try:
            _alg, leaf_der = envelope.peek_signer(value, max_bytes=64 * 1024)
            return load_certificate(leaf_der)
        except errors.RejectedError:
            return None

    async def refresh_revocation(self, value: bytes, bus: Bus) -> None:
        """Fetch the CRLs needed to check the signer of ``value``, if they are not fresh (the
        guard calls this before :meth:`verify`)."""
        if self.crls is None:
            return
        leaf = self.signer(value)
        if leaf is None:
            return
        now = self._clock.now()
        try:
            verify_issued_by(leaf, self._ca, now=now)  # no fetch on behalf of a certificate not ours
        except errors.RejectedError:
            return
        await revocation.refresh(self.crls, bus, leaf, now)

    def verify(self, value: bytes) -> ModeRecord:
        try:
            return self._verify(value)
        except RevokedSignerError as exc:
            raise RevokedSignerError(
                f"the mode record is not signed by the supervisor: {exc.message}", field="mode"
            ) from None
        except errors.RejectedError as exc:
            raise errors.UntrustedError(
                f"the mode record is not signed by the supervisor: {exc.message}", field="mode"
            ) from None

    def _verify(self, value: bytes) -> ModeRecord:
        if value.lstrip().startswith(b"{"):
            raise errors.BadSignatureError("it is plain JSON, without a signature (an old or forged record)")
        alg, leaf_der = envelope.peek_signer(value, max_bytes=64 * 1024)
        leaf = load_certificate(leaf_der)
        now = self._clock.now()
        verify_issued_by(leaf, self._ca, now=now)
        if module_of(leaf) != (subjects.SUPERVISOR, None):
            raise errors.UntrustedError(
                f"it is signed by {leaf.subject.rfc4514_string()}, which is not the supervisor ({subjects.SUPERVISOR})"
            )
        if self.crls is not None:
            self.crls.check(leaf)
        env = envelope.verify(
            value,
            leaf,
            envelope.jose_key(leaf.public_key()),  # type: ignore[arg-type]
            alg=alg,
            op=OP,
            aud=AUDIENCE,
            now=now,
            window=_FOREVER,
        )
        try:
            record = msgspec.json.decode(env.body, type=ModeRecord)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise errors.BadRequestError(f"its body is not a mode record: {exc}") from None
        if record.mode not in set(Mode):
            raise errors.BadRequestError(f"it names an unknown mode {record.mode!r}")
        return record
