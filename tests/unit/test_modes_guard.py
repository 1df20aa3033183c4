"""ModeGuard: services check the mode themselves (defence in depth), on the in-memory bus."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm import errors
from iotdlm.bus import subjects
from iotdlm.bus.api import KeyValue, Message
from iotdlm.bus.memory import MemoryBus, MemoryHub
from iotdlm.modes import DEVICE_CERTIFICATE_MODES, ModeGuard, cm_running, modes_where
from iotdlm.modes.guard import AlarmLimiter
from iotdlm.modes.table import Mode
from iotdlm.wire.modes import ModeAlarm, ModeRecord, decode, encode
from tests.helpers import make_pki
from tests.mode_signing import pki, put_mode, signed, verifier


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def hub() -> MemoryHub:
    return MemoryHub()


@pytest.fixture
async def owner(hub: MemoryHub) -> AsyncIterator[KeyValue]:
    bus = MemoryBus(hub, subjects.SUPERVISOR)
    yield await bus.key_value(subjects.MODE_BUCKET, create=True)
    await bus.close()


async def set_mode(kv: KeyValue, mode: str) -> None:
    await put_mode(kv, mode)


async def test_km_refuses_device_certificates_outside_provisioning_certificate(hub: MemoryHub, owner: KeyValue) -> None:
    await set_mode(owner, Mode.CERTIFICATE_MANAGEMENT)
    km = MemoryBus(hub, "km")
    async with ModeGuard(km, verifier()) as guard:
        with pytest.raises(errors.ModeError) as info:
            guard.require(DEVICE_CERTIFICATE_MODES, "issuing a device certificate for pm")
        err = info.value
        assert err.code == "wrong_mode"
        assert err.field == "mode"
        assert "certificate-management" in err.message  # the current mode
        assert "provisioning-certificate" in err.message  # what it would take
        assert "iotdlm mode set provisioning-certificate" in err.message

        await set_mode(owner, Mode.PROVISIONING_CERTIFICATE)
        await guard.wait_for(Mode.PROVISIONING_CERTIFICATE)  # the watch brings the change
        assert guard.require(DEVICE_CERTIFICATE_MODES, "issuing") == "provisioning-certificate"
        record = guard.record
        assert record is not None
        assert record.by == "test"
    await km.close()


async def test_unknown_mode_is_refused(hub: MemoryHub) -> None:
    pm = MemoryBus(hub, "pm")
    async with ModeGuard(pm, verifier()) as guard:  # no bucket at all: no supervisor ever ran
        assert guard.mode is None
        with pytest.raises(errors.ModeError, match="unknown"):
            guard.require(modes_where("pm"), "provisioning")
    await pm.close()


async def test_a_deleted_or_garbled_mode_is_unknown(hub: MemoryHub, owner: KeyValue) -> None:
    await set_mode(owner, Mode.PROVISIONING_SOFTWARE)
    pm = MemoryBus(hub, "pm")
    async with ModeGuard(pm, verifier()) as guard:
        assert guard.require(modes_where("pm"), "flashing") == "provisioning-software"
        await owner.delete(subjects.MODE_KEY)  # the supervisor stopped
        await guard.wait_for(None)
        await set_mode(owner, Mode.PROVISIONING_SOFTWARE)
        await guard.wait_for(Mode.PROVISIONING_SOFTWARE)
        for garbage in (b"not json", b'{"mode": "maintenance", "since": "s", "by": "b"}', b"{}"):
            await owner.put(subjects.MODE_KEY, garbage)
            await guard.wait_for(None)
            with pytest.raises(errors.ModeError, match="cannot be trusted"):
                guard.require(modes_where("pm"), "flashing")
            await set_mode(owner, Mode.PROVISIONING_SOFTWARE)
            await guard.wait_for(Mode.PROVISIONING_SOFTWARE)
    await pm.close()


async def test_a_mode_not_confirmed_for_max_age_is_unknown(hub: MemoryHub, owner: KeyValue) -> None:
    await set_mode(owner, Mode.PROVISIONING_CERTIFICATE)
    clock = FakeMonotonic()
    km = MemoryBus(hub, "km")
    guard = ModeGuard(km, verifier(), max_age=5.0, refresh_every=3600, monotonic=clock)
    await guard.start()
    assert guard.require(DEVICE_CERTIFICATE_MODES, "issuing") == "provisioning-certificate"
    await km.close()  # the bus is gone: nothing can confirm the mode any more
    clock.now += 4.0
    assert guard.mode == "provisioning-certificate"
    clock.now += 2.0
    assert guard.mode is None
    with pytest.raises(errors.ModeError, match="could not be read for 5 s"):
        guard.require(DEVICE_CERTIFICATE_MODES, "issuing")
    with pytest.raises(errors.UnavailableError):
        await guard.refresh()
    await guard.stop()


async def test_guard_polls_when_the_watch_cannot_start(hub: MemoryHub) -> None:
    # the bucket appears after the service started (supervisor came up later): the poll finds it
    pm = MemoryBus(hub, "pm")
    guard = ModeGuard(pm, verifier(), refresh_every=0.01)
    await guard.start()
    assert guard.mode is None
    sup = MemoryBus(hub, subjects.SUPERVISOR)
    kv = await sup.key_value(subjects.MODE_BUCKET, create=True)
    await set_mode(kv, Mode.PROVISIONING_SOFTWARE)
    await guard.wait_for(Mode.PROVISIONING_SOFTWARE)
    await set_mode(kv, Mode.PROVISIONING_CERTIFICATE)
    await guard.wait_for(Mode.PROVISIONING_CERTIFICATE)
    await guard.stop()
    await sup.close()
    await pm.close()


async def test_require_needs_allowed_modes(hub: MemoryHub) -> None:
    guard = ModeGuard(MemoryBus(hub, "km"), verifier())
    with pytest.raises(ValueError, match="at least one"):
        guard.require(set(), "anything")
    with pytest.raises(ValueError, match="positive"):
        ModeGuard(MemoryBus(hub, "km"), verifier(), max_age=0)


async def test_wait_for_times_out_as_unavailable(hub: MemoryHub) -> None:
    guard = ModeGuard(MemoryBus(hub, "km"), verifier())
    with pytest.raises(errors.UnavailableError, match="did not become"):
        await guard.wait_for(Mode.SOFTWARE_MANAGEMENT, timeout=0.01)


async def test_pm_refuses_while_cm_runs(hub: MemoryHub, owner: KeyValue) -> None:
    await set_mode(owner, Mode.PROVISIONING_CERTIFICATE)
    pm = MemoryBus(hub, "pm")
    cm = MemoryBus(hub, "cm")
    async with ModeGuard(pm, verifier()) as guard:
        guard.require(modes_where("pm"), "provisioning")
        assert not await cm_running(pm)
        await guard.require_cm_off("provisioning")  # cm off: allowed

        async def pong(msg: Message) -> bytes:
            return b"pong"

        sub = await cm.serve(subjects.CM_PING, pong)
        assert await cm_running(pm)
        with pytest.raises(errors.ModeError, match="cm is running"):
            await guard.require_cm_off("provisioning")
        await sub.unsubscribe()
        assert not await cm_running(pm)

        async def refuse(msg: Message) -> bytes:
            raise errors.NotAuthorizedError("go away")

        await cm.serve(subjects.CM_PING, refuse)
        assert await cm_running(pm)  # an error answer still means cm runs
    await pm.close()
    await cm.close()


async def test_cm_ping_permissions() -> None:
    hub = MemoryHub()
    km = MemoryBus(hub, "km")
    with pytest.raises(errors.PermissionDeniedError):  # only pm (and admin) ask whether cm runs
        await cm_running(km)
    sm = MemoryBus(hub, "sm")

    async def pong(msg: Message) -> bytes:
        return b""

    with pytest.raises(errors.PermissionDeniedError):  # only cm answers it
        await sm.serve(subjects.CM_PING, pong)
    await km.close()
    await sm.close()


async def test_guard_check_runs_from_a_worker_thread(hub: MemoryHub, owner: KeyValue) -> None:
    await set_mode(owner, Mode.PROVISIONING_CERTIFICATE)
    km = MemoryBus(hub, "km")
    async with ModeGuard(km, verifier()) as guard:
        mode = await asyncio.to_thread(guard.require, DEVICE_CERTIFICATE_MODES, "issuing")
        assert mode == Mode.PROVISIONING_CERTIFICATE
    await km.close()


def test_only_the_supervisor_writes_the_mode_and_answers_modes_subjects() -> None:
    from iotdlm.bus.memory import pattern_covers, subject_matches

    for module, perms in subjects.PERMISSIONS.items():
        writes = any(subject_matches(a, subjects.kv_subject(subjects.MODE_BUCKET, "mode")) for a in perms.publish)
        assert writes == (module == subjects.SUPERVISOR), module
        serves = any(pattern_covers(a, subjects.MODES_SET) for a in perms.subscribe)
        assert serves == (module == subjects.SUPERVISOR), module
        reads = any(subject_matches(a, f"$JS.API.STREAM.INFO.KV_{subjects.MODE_BUCKET}") for a in perms.jetstream)
        assert reads, module
    admin = subjects.PERMISSIONS["admin"].publish
    assert any(subject_matches(a, subjects.MODES_SET) for a in admin)
    assert any(subject_matches(a, subjects.MODES_STATUS) for a in admin)
    for module in ("km", "pm", "sm", "cm"):
        assert not any(subject_matches(a, subjects.MODES_SET) for a in subjects.PERMISSIONS[module].publish)


# --- the signed mode record (issue 11) -----------------------------------------------------------


class Alarms:
    """The mode alarms services publish (``iotdlm.v1.events.<module>.mode_alarm``)."""

    def __init__(self) -> None:
        self.got: asyncio.Queue[tuple[str, ModeAlarm]] = asyncio.Queue()

    async def handler(self, m: Message) -> None:
        self.got.put_nowait((m.subject, decode(m.data, ModeAlarm)))

    async def next(self) -> tuple[str, ModeAlarm]:
        return await asyncio.wait_for(self.got.get(), 5)


def _forgeries() -> dict[str, bytes]:
    other_ca = make_pki()
    good = signed(Mode.PROVISIONING_CERTIFICATE)
    header, payload, sig = good.split(b".")
    forged_payload = base64.urlsafe_b64encode(
        base64.urlsafe_b64decode(payload + b"==").replace(b"provisioning-certificate", b"provisioning-software")
    ).rstrip(b"=")
    return {
        # the old format, or what a forged stream transform carries
        "unsigned": encode(ModeRecord(mode=Mode.PROVISIONING_CERTIFICATE, since="2026-11-21T12:00:00+00:00", by="x")),
        # cm's stolen key and certificate, from the same service CA
        "signed by cm": signed(Mode.PROVISIONING_CERTIFICATE, signer=pki().module("cm")),
        # a supervisor of another deployment
        "another CA": signed(Mode.PROVISIONING_CERTIFICATE, signer=other_ca.module(subjects.SUPERVISOR)),
        # a genuine record with another mode written into its body
        "tampered": b".".join((header, forged_payload, sig)),
        "garbage": b"a.b.c",
    }


@pytest.mark.parametrize("forgery", sorted(_forgeries()))
async def test_a_mode_record_not_signed_by_the_supervisor_is_refused_with_an_alarm(
    hub: MemoryHub, owner: KeyValue, forgery: str
) -> None:
    """A value in the bucket that does not verify as the supervisor's (unsigned, signed by
    another module or another deployment, tampered with) is no valid mode: the service refuses
    work, naming why, and publishes one alarm per forged value, which the supervisor audits."""
    alarms = Alarms()
    admin = MemoryBus(hub, "admin")
    await admin.subscribe(f"{subjects.EVENTS}.*.{subjects.MODE_ALARM}", alarms.handler)
    await set_mode(owner, Mode.CERTIFICATE_MANAGEMENT)
    km = MemoryBus(hub, "km")
    async with ModeGuard(km, verifier(), refresh_every=0.01) as guard:
        assert guard.mode == Mode.CERTIFICATE_MANAGEMENT
        revision = await owner.put(subjects.MODE_KEY, _forgeries()[forgery])
        await guard.wait_for(None)
        with pytest.raises(errors.ModeError, match="cannot be trusted") as info:
            guard.require(DEVICE_CERTIFICATE_MODES, "issuing a device certificate for pm")
        assert "not signed by the supervisor" in info.value.message
        subject, alarm = await alarms.next()
        assert subject == f"{subjects.EVENTS}.km.{subjects.MODE_ALARM}"
        assert (alarm.module, alarm.revision) == ("km", revision)
        assert "not signed by the supervisor" in alarm.reason
        await asyncio.sleep(0.05)  # several polls of the same value: still one alarm
        assert alarms.got.empty()
        await set_mode(owner, Mode.PROVISIONING_CERTIFICATE)  # the operator re-asserts
        await guard.wait_for(Mode.PROVISIONING_CERTIFICATE)
        assert guard.problem is None
    await km.close()
    await admin.close()


def test_the_verifier_names_why() -> None:
    v = verifier()
    forgeries = _forgeries()
    for value in forgeries.values():
        with pytest.raises(errors.RejectedError, match="not signed by the supervisor"):
            v.verify(value)
    with pytest.raises(errors.RejectedError, match="plain JSON"):
        v.verify(forgeries["unsigned"])
    with pytest.raises(errors.RejectedError, match="not the supervisor"):
        v.verify(forgeries["signed by cm"])
    assert v.verify(signed(Mode.SOFTWARE_MANAGEMENT, by="ops")).by == "ops"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_the_verifier_refuses_any_bytes_in_words(value: bytes) -> None:
    """Hypothesis: whatever (unsigned) bytes the bucket holds, the verifier refuses them with a
    RejectedError in words, never another exception."""
    with pytest.raises(errors.RejectedError) as info:
        verifier().verify(value)
    assert info.value.message.startswith("the mode record is not signed by the supervisor: ")


# --- the alarm flood (issue 11 leftover) ---------------------------------------------------------


def test_alarm_limiter_admits_a_reason_once_per_window_and_counts_what_it_held_back() -> None:
    clock = FakeMonotonic()
    limiter = AlarmLimiter(every=60.0, monotonic=clock, max_reasons=2)
    assert limiter.admit("forged") == 0
    assert limiter.admit("forged") is None
    assert limiter.admit("forged") is None
    assert limiter.admit("unsigned") == 0  # another reason: its own limit
    clock.now += 59.9
    assert limiter.admit("forged") is None
    clock.now += 0.1
    assert limiter.admit("forged") == 3  # the next one reports the three held back
    assert limiter.admit("forged") is None
    # "unsigned" is forgotten (its window ended, nothing held back): "a" gets its slot; once two
    # reasons are tracked, every new one shares one limit, so an attacker who varies the reason
    # still gets one alarm per window
    assert limiter.admit("signed by CN=a") == 0
    assert limiter.admit("signed by CN=b") == 0
    assert limiter.admit("signed by CN=c") is None
    assert limiter.admit("signed by CN=d") is None
    clock.now += 30.0
    assert limiter.admit("signed by CN=e") is None
    clock.now += 30.0
    # "forged" (one held back) and the shared limit (three held back) are still tracked
    assert limiter.admit("signed by CN=f") == 3
    assert limiter.admit("forged") == 1
    with pytest.raises(ValueError, match="positive"):
        AlarmLimiter(every=0, monotonic=clock)


async def test_a_flood_of_forged_mode_records_raises_one_alarm_per_window(hub: MemoryHub, owner: KeyValue) -> None:
    """Whoever can write the bucket could write forged records without end, each one an alarm in
    the log and the audit log. The guard reports the same reason once per ``alarm_every`` seconds
    (on its injected clock); the next alarm says how many it held back. The service refuses work
    all along."""
    alarms = Alarms()
    admin = MemoryBus(hub, "admin")
    await admin.subscribe(f"{subjects.EVENTS}.*.{subjects.MODE_ALARM}", alarms.handler)
    await set_mode(owner, Mode.CERTIFICATE_MANAGEMENT)
    clock = FakeMonotonic()
    km = MemoryBus(hub, "km")
    cm = pki().module("cm")

    async def forge(n: int) -> int:
        revision = await owner.put(subjects.MODE_KEY, signed(Mode.PROVISIONING_CERTIFICATE, by=f"x{n}", signer=cm))

        async def handled() -> None:
            while guard.refused_revision != revision:  # noqa: ASYNC110 - the watch's handler sets it
                await asyncio.sleep(0.001)

        await asyncio.wait_for(handled(), 5)
        return revision

    guard = ModeGuard(km, verifier(), refresh_every=3600, max_age=3600, monotonic=clock, alarm_every=60.0)
    async with guard:
        first = await forge(0)
        _, alarm = await alarms.next()
        assert (alarm.revision, alarm.suppressed) == (first, 0)
        for n in range(1, 6):
            await forge(n)
            clock.now += 1.0
        await asyncio.sleep(0.05)
        assert alarms.got.empty()  # five forged values, no alarm
        with pytest.raises(errors.ModeError, match="cannot be trusted"):
            guard.require(DEVICE_CERTIFICATE_MODES, "issuing")
        clock.now += 60.0
        last = await forge(6)
        _, alarm = await alarms.next()
        assert (alarm.revision, alarm.suppressed) == (last, 5)
        assert "not the supervisor" in alarm.reason
    await km.close()
    await admin.close()
