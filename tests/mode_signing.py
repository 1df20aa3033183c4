"""Signed mode records for tests on the in-memory bus: a supervisor identity (``modes``) from the
test PKI, the verifier a service's ModeGuard uses, and the bucket value the supervisor writes."""

from __future__ import annotations

import functools

from iotdlm.bus import subjects
from iotdlm.bus.api import KeyValue
from iotdlm.clock import FixedClock
from iotdlm.modes.signed import ModeVerifier, seal_record
from iotdlm.wire.modes import ModeRecord
from tests.helpers import NOW, Identity, Pki, make_pki


@functools.cache
def pki() -> Pki:
    return make_pki()


def supervisor() -> Identity:
    return pki().module(subjects.SUPERVISOR)


def verifier() -> ModeVerifier:
    """What a service's ModeGuard checks records with: the test service CA, at NOW."""
    return ModeVerifier(pki().cas["service"].certificate, FixedClock(NOW))


def signed(mode: str, *, by: str = "test", signer: Identity | None = None) -> bytes:
    record = ModeRecord(mode=mode, since=NOW.isoformat(timespec="seconds"), by=by)
    return seal_record((signer or supervisor()).sealer, record, now=NOW)


async def put_mode(kv: KeyValue, mode: str, *, by: str = "test") -> None:
    """Write ``mode`` to the mode bucket as the supervisor does (signed)."""
    await kv.put(subjects.MODE_KEY, signed(mode, by=by))
