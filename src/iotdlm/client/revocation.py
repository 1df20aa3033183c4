"""Fetch the service CA's CRLs over the bus for a signer check (the I/O shell of
:class:`iotdlm.pki.revocation.ServiceCrls`).

km serves every CRL on ``iotdlm.v1.km.va.crl`` as the CA signed it; what comes back is checked by
:meth:`ServiceCrls.add` (signature, partition), so it does not matter who answered. A fetch that
fails is logged and retried after ``retry_after``: the check then relies on the CRLs seen before
(soft-fail, see :mod:`iotdlm.pki.revocation`).
"""

from __future__ import annotations

import datetime as dt
import logging

import msgspec
from cryptography import x509

from iotdlm.bus import Bus
from iotdlm.bus import subjects as s
from iotdlm.errors import IotdlmError
from iotdlm.pki.revocation import ServiceCrls
from iotdlm.wire import km as msg

log = logging.getLogger(__name__)

#: how long one CRL request may take
CRL_TIMEOUT = 5.0


def alarm_subject(module: str) -> str:
    """Where ``module`` reports a signer it refused because its certificate is revoked."""
    return s.events(module, s.SIGNER_ALARM)


async def alarm(bus: Bus, signer: str, reason: str) -> None:
    """Report a refused revoked signer (``signer``: km or modes): logged, and published on
    ``iotdlm.v1.events.<module>.signer_alarm``, which the supervisor writes to the audit log."""
    log.error("%s refuses a message signed by %s: %s", bus.module, signer, reason)
    body = msgspec.json.encode({"module": bus.module, "signer": signer, "reason": reason[:500]})
    try:
        await bus.publish(alarm_subject(bus.module), body)
    except IotdlmError as exc:
        log.error("%s could not publish the signer alarm: %s", bus.module, exc.message)


async def refresh(
    crls: ServiceCrls,
    bus: Bus,
    signer: x509.Certificate,
    now: dt.datetime,
    *,
    timeout: float = CRL_TIMEOUT,  # noqa: ASYNC109
) -> None:
    """Fetch the CRLs ``crls`` lacks to check ``signer`` at ``now`` (none when they are fresh)."""
    for partition, delta in crls.wanted(signer, now):
        crls.tried(partition, delta, now)
        body = msg.encode(msg.CrlRequest(issuer=crls.issuer, partition=partition, delta=delta))
        try:
            data = await bus.request(s.KM_CRL, body, timeout=timeout)
            crls.add(data, partition, delta=delta)
        except IotdlmError as exc:
            log.warning(
                "%s: cannot fetch the %s CRL %s/%d to check %s: %s",
                bus.module,
                "delta" if delta else "full",
                crls.issuer,
                partition,
                signer.subject.rfc4514_string(),
                exc.message,
            )
