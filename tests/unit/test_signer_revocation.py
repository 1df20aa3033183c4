"""Revoked signers: km's and the supervisor's certificates checked against the service CA's CRLs
(pure :class:`ServiceCrls`, then the mode guard on the in-memory bus)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm import errors
from iotdlm.bus import subjects
from iotdlm.bus.api import Message
from iotdlm.bus.memory import MemoryBus, MemoryHub
from iotdlm.clock import FixedClock
from iotdlm.modes import ModeGuard
from iotdlm.modes.signed import ModeVerifier
from iotdlm.modes.table import Mode
from iotdlm.pki import crl as pki_crl
from iotdlm.pki.ca import IssuingCA
from iotdlm.pki.revocation import RevokedSignerError, ServiceCrls
from iotdlm.wire import km as msg
from iotdlm.wire.modes import ModeAlarm, decode
from tests.helpers import NOW, URLS, make_pki
from tests.mode_signing import pki, put_mode, supervisor

PARTITIONS = URLS.crl_partitions


def crl_der(
    ca: IssuingCA,
    serials: list[int],
    partition: int,
    *,
    delta: bool = False,
    number: int = 2,
    this_update: dt.datetime = NOW,
    reason: str | None = "keyCompromise",
) -> bytes:
    entries = [pki_crl.RevokedEntry(serial=s, revoked_at=this_update, reason=reason) for s in serials]
    crl = pki_crl.build_crl(
        ca,
        entries,
        number=number,
        this_update=this_update,
        next_update=this_update + dt.timedelta(hours=1),
        partition=partition,
        urls=URLS,
        delta_base=1 if delta else None,
    )
    return crl.public_bytes(Encoding.DER)


def service_crls() -> ServiceCrls:
    return ServiceCrls(pki().cas["service"].certificate, partitions=PARTITIONS)


def signer() -> x509.Certificate:
    return supervisor().cert


def test_a_serial_on_the_full_or_the_delta_crl_is_revoked_for_good() -> None:
    ca = pki().cas["service"]
    cert = signer()
    p = service_crls().partition_of(cert)
    assert p == cert.serial_number % PARTITIONS  # no distribution point in the test certificate
    for delta in (False, True):
        crls = service_crls()
        crls.check(cert)  # nothing seen: not revoked
        crls.add(crl_der(ca, [cert.serial_number], p, delta=delta), p, delta=delta)
        with pytest.raises(RevokedSignerError, match="is revoked"):
            crls.check(cert)
        # a newer CRL without it (or an old one replayed) does not un-revoke it
        crls.add(crl_der(ca, [], p, delta=delta, number=3), p, delta=delta)
        with pytest.raises(RevokedSignerError):
            crls.check(cert)
    # removeFromCRL (a delta entry taking a hold back) is no revocation
    crls = service_crls()
    crls.add(crl_der(ca, [cert.serial_number], p, delta=True, reason="removeFromCRL"), p, delta=True)
    crls.check(cert)


def test_hostile_crls_are_refused_naming_why() -> None:
    ca = pki().cas["service"]
    other = make_pki().cas["service"]
    cert = signer()
    p = service_crls().partition_of(cert)
    good = crl_der(ca, [cert.serial_number], p)
    tampered = bytearray(good)
    tampered[-5] ^= 1
    cases = {
        "not a DER": (b"garbage", p, False),
        "not by the service CA": (crl_der(make_pki().cas["factory"], [], p), p, False),
        "signature does not verify": (bytes(tampered), p, False),
        "partition": (crl_der(ca, [], (p + 1) % PARTITIONS), p, False),
        "delta CRL was sent where the full": (crl_der(ca, [], p, delta=True), p, False),
        "full CRL was sent where the delta": (crl_der(ca, [], p), p, True),
    }
    for why, (data, partition, delta) in cases.items():
        crls = service_crls()
        with pytest.raises(errors.RejectedError, match=why):
            crls.add(data, partition, delta=delta)
        crls.check(cert)  # nothing accepted
    # another deployment's service CA with the same name: its signature does not verify with ours
    lookalike = ServiceCrls(ca.certificate, partitions=PARTITIONS)
    with pytest.raises(errors.RejectedError):
        lookalike.add(crl_der(other, [cert.serial_number], p), p, delta=False)
    lookalike.check(cert)


def test_wanted_until_fresh_then_after_next_update_and_not_hammered_on_failure() -> None:
    ca = pki().cas["service"]
    cert = signer()
    crls = service_crls()
    p = crls.partition_of(cert)
    assert crls.wanted(cert, NOW) == [(p, False), (p, True)]
    crls.tried(p, False, NOW)
    crls.tried(p, True, NOW)
    assert crls.wanted(cert, NOW + dt.timedelta(seconds=59)) == []  # failed a moment ago: wait
    assert crls.wanted(cert, NOW + dt.timedelta(seconds=60)) == [(p, False), (p, True)]
    crls.add(crl_der(ca, [], p), p, delta=False)
    crls.add(crl_der(ca, [], p, delta=True), p, delta=True)
    later = NOW + dt.timedelta(minutes=5)
    assert crls.wanted(cert, later) == []
    assert crls.wanted(cert, NOW + dt.timedelta(hours=1)) == [(p, False), (p, True)]  # past nextUpdate


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_as_a_crl_are_refused_or_accepted_never_a_crash(data: bytes) -> None:
    crls = service_crls()
    with contextlib.suppress(errors.RejectedError):
        crls.add(data, 0, delta=False)
    crls.check(signer())


# --- the mode guard fetches the CRL from km's VA ---------------------------------------------------


async def test_a_mode_record_signed_by_a_revoked_supervisor_certificate_is_refused_with_alarms() -> None:
    """The supervisor's key was stolen and its certificate revoked: a mode record signed with it
    sets no mode. The guard fetches the service CA's CRLs of the certificate's partition from
    km's VA (``km.va.crl``), refuses the record with a mode alarm and a signer alarm (which the
    supervisor audits), and accepts records again once signed by a new supervisor certificate."""
    hub = MemoryHub()
    ca = pki().cas["service"]
    revoked = signer()
    km = MemoryBus(hub, "km")
    asked: list[msg.CrlRequest] = []

    async def serve_crl(m: Message) -> bytes:
        req = msg.decode(m.data, msg.CrlRequest)
        asked.append(req)
        return crl_der(ca, [revoked.serial_number], req.partition, delta=req.delta)

    await km.serve(subjects.KM_CRL, serve_crl)
    alarms: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    admin = MemoryBus(hub, "admin")

    async def on_alarm(m: Message) -> None:
        alarms.put_nowait((m.subject, m.data))

    await admin.subscribe(f"{subjects.EVENTS}.>", on_alarm)
    owner = await MemoryBus(hub, subjects.SUPERVISOR).key_value(subjects.MODE_BUCKET, create=True)
    await put_mode(owner, Mode.CERTIFICATE_MANAGEMENT)
    verifier = ModeVerifier(ca.certificate, FixedClock(NOW), crls=service_crls())
    cm = MemoryBus(hub, "cm")
    async with ModeGuard(cm, verifier) as guard:
        assert guard.mode is None
        assert guard.problem is not None
        assert "is revoked" in guard.problem
        assert {(r.issuer, r.delta) for r in asked} == {("service", False), ("service", True)}
        got = {}
        for _ in range(2):
            subject, data = await asyncio.wait_for(alarms.get(), 5)
            got[subject.rsplit(".", 1)[-1]] = data
        assert "is revoked" in decode(got[subjects.MODE_ALARM], ModeAlarm).reason
        assert b"is revoked" in got[subjects.SIGNER_ALARM]
        with pytest.raises(errors.ModeError, match="is revoked"):
            guard.require({Mode.CERTIFICATE_MANAGEMENT}, "serving EST")
        # the operator gives the supervisor a new key and certificate: its records are accepted
        old = pki().identities.pop(subjects.SUPERVISOR)
        try:
            assert supervisor().cert.serial_number != revoked.serial_number
            await put_mode(owner, Mode.CERTIFICATE_MANAGEMENT)
            await guard.wait_for(Mode.CERTIFICATE_MANAGEMENT)
        finally:
            pki().identities[subjects.SUPERVISOR] = old  # the other tests' supervisor
    await cm.close()
    await km.close()
    await admin.close()
