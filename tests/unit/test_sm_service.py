"""sm on the in-memory bus (permissions enforced as nats-server would): pm lists and loads stored
software, a repository notification triggers a check, outcomes become events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from tuf.api._payload import Targets

from iotdlm import software
from iotdlm.bus import Message
from iotdlm.bus import subjects as s
from iotdlm.bus.memory import MemoryHub
from iotdlm.client.sm import SM_NOTIFY, SmClient
from iotdlm.errors import BadRequestError, ModeError, NotFoundError, PermissionDeniedError
from iotdlm.modes.guard import ModeGuard
from iotdlm.modes.table import Mode
from iotdlm.sm.service import SmService
from iotdlm.wire import software as sw
from tests.mode_signing import put_mode, verifier
from tests.unit.test_sm_updater import DTYPE, KEY, SM, SmEnv, make_env
from tests.unit.test_software_check import forge_role


class Events:
    """Collects sm's events as the admin console would."""

    def __init__(self) -> None:
        self.got: asyncio.Queue[sw.SmEvent] = asyncio.Queue()

    async def handler(self, m: Message) -> None:
        assert m.subject.startswith(f"{s.EVENTS}.sm.")
        self.got.put_nowait(msgspec.json.decode(m.data, type=sw.SmEvent))

    async def next(self) -> sw.SmEvent:
        return await asyncio.wait_for(self.got.get(), 20)


@pytest.fixture
async def running(tmp_path: Path, memory_hub: MemoryHub) -> AsyncIterator[tuple[SmEnv, SmService, Events]]:
    env = make_env(tmp_path)
    service = SmService(env.manager(), memory_hub.bus("sm"), dtypes=[DTYPE], poll_interval=None)
    events = Events()
    await memory_hub.bus("admin").subscribe(f"{s.EVENTS}.sm.>", events.handler)
    await service.start()
    try:
        yield env, service, events
    finally:
        await service.stop()


async def test_first_check_then_pm_lists_and_loads(
    running: tuple[SmEnv, SmService, Events], memory_hub: MemoryHub
) -> None:
    env, _service, events = running
    first = await events.next()  # the check at start-up: nothing published yet
    assert (first.kind, first.release_counter) == ("checked", None)
    env.publish(3)
    pm = SmClient(memory_hub.bus("pm"))
    assert await pm.list(DTYPE) == []
    with pytest.raises(NotFoundError):
        await pm.load(DTYPE)
    await SmClient(memory_hub.bus("admin")).notify(DTYPE)  # what cm relays from the repository's webhook
    ev = await events.next()
    assert (ev.kind, ev.dtype, ev.release_counter) == ("stored", DTYPE, 3)
    (v,) = await pm.list(DTYPE)
    assert (v.dtype, v.release_counter, v.target_path) == (DTYPE, 3, f"{DTYPE}/fw.bin")
    loaded = await pm.load(DTYPE)
    assert loaded.release_counter == 3
    meta = software.decrypt_meta(loaded.meta_enc, KEY, DTYPE, 3)
    out = software.verify_software(
        Path(loaded.image_path), meta, loaded.sig_sm, SM.key.public_key(), env.repo.trusted_root(), dtype=DTYPE
    )
    assert out.sha256 == v.sha256
    assert (await pm.load(DTYPE, 3)).image_path == loaded.image_path


async def test_no_release_then_refused_event_on_rollback(running: tuple[SmEnv, SmService, Events]) -> None:
    env, service, events = running
    assert (await events.next()).kind == "checked"
    env.publish(3, name="a.bin")
    env.publish(4, name="b.bin")
    service.trigger(DTYPE)
    assert (await events.next()).release_counter == 4

    def drop(t: Targets) -> None:
        del t.targets[f"{DTYPE}/b.bin"]

    forge_role(env.repo, DTYPE, drop)
    service.trigger(DTYPE)
    ev = await events.next()
    assert (ev.kind, ev.code, ev.field) == ("refused", "replay", "release_counter")
    assert ev.message is not None
    assert "rollback attempt" in ev.message


async def test_unreachable_repository_is_a_failed_event(tmp_path: Path, memory_hub: MemoryHub) -> None:
    env = make_env(tmp_path)
    env.fetcher.down = True
    events = Events()
    await memory_hub.bus("admin").subscribe(f"{s.EVENTS}.sm.>", events.handler)
    service = SmService(env.manager(), memory_hub.bus("sm"), dtypes=[DTYPE], poll_interval=None)
    await service.start()
    try:
        ev = await events.next()
        assert (ev.kind, ev.code) == ("failed", "unavailable")
    finally:
        await service.stop()


async def test_sm_started_before_the_repository_is_reachable_tries_again_soon(
    tmp_path: Path, memory_hub: MemoryHub
) -> None:
    """Issue 14, stumble 6: sm started before cm's egress proxy was up waited a whole poll interval
    (an hour). Now an unreachable repository is tried again after a short, doubling delay."""
    env = make_env(tmp_path)
    env.fetcher.down = True
    events = Events()
    await memory_hub.bus("admin").subscribe(f"{s.EVENTS}.sm.>", events.handler)
    service = SmService(env.manager(), memory_hub.bus("sm"), dtypes=[DTYPE], poll_interval=3600.0, retry_after=0.05)
    await service.start()
    try:
        assert (await events.next()).kind == "failed"
        assert (await events.next()).kind == "failed"  # tried again, long before the poll interval
        env.publish(3)
        env.fetcher.down = False  # the proxy is up now
        kinds = []
        while not kinds or kinds[-1] == "failed":
            kinds.append((await events.next()).kind)
        assert kinds[-1] == "stored"
    finally:
        await service.stop()


async def test_a_reachable_repository_is_not_checked_again_before_the_poll_interval(
    tmp_path: Path, memory_hub: MemoryHub
) -> None:
    env = make_env(tmp_path)
    events = Events()
    await memory_hub.bus("admin").subscribe(f"{s.EVENTS}.sm.>", events.handler)
    service = SmService(env.manager(), memory_hub.bus("sm"), dtypes=[DTYPE], poll_interval=3600.0, retry_after=0.01)
    await service.start()
    try:
        assert (await events.next()).kind == "checked"
        await asyncio.sleep(0.3)  # thirty retry delays: a retry would have come
        assert events.got.empty()
    finally:
        await service.stop()


async def test_admin_lists_what_sm_holds_verified_again_but_cannot_load_it(
    running: tuple[SmEnv, SmService, Events], memory_hub: MemoryHub
) -> None:
    """The console's Software page: ``sm.software.held`` re-runs Algorithm 1 on every stored
    release, so a release altered on disk shows as failed (with why) before pm halts on it."""
    env, _service, events = running
    assert (await events.next()).kind == "checked"
    admin = memory_hub.bus("admin")
    assert sw.decode(await admin.request(s.SM_SOFTWARE_HELD, b""), sw.HeldResponse).releases == []
    env.publish(3)
    await SmClient(admin).notify(DTYPE)
    assert (await events.next()).kind == "stored"
    held = sw.decode(await admin.request(s.SM_SOFTWARE_HELD, b'{"dtype": "boardA"}'), sw.HeldResponse)
    (r,) = held.releases
    (v,) = await SmClient(memory_hub.bus("pm")).list(DTYPE)
    assert (r.dtype, r.release_counter, r.sha256, r.sig_sm, r.problem) == (DTYPE, 3, v.sha256, "verified", None)
    assert DTYPE in held.checked_at
    image = env.local.paths(DTYPE, 3).image
    image.write_bytes(b"X" + image.read_bytes()[1:])  # altered on disk after sm stored it
    (bad,) = sw.decode(await admin.request(s.SM_SOFTWARE_HELD, b"{}"), sw.HeldResponse).releases
    assert bad.sig_sm == "failed"
    assert bad.problem is not None
    assert "sig_sm" in bad.problem
    with pytest.raises(PermissionDeniedError):  # the admin identity lists; loading for flashing is pm's
        await admin.request(s.SM_SOFTWARE_LOAD, b'{"dtype": "boardA"}')
    with pytest.raises(BadRequestError):
        await admin.request(s.SM_SOFTWARE_HELD, b'{"dtype": "../etc"}')


async def test_bad_requests_are_refused(running: tuple[SmEnv, SmService, Events], memory_hub: MemoryHub) -> None:
    pm = memory_hub.bus("pm")
    with pytest.raises(BadRequestError):
        await pm.request(s.SM_SOFTWARE_LIST, b'{"dtype": "../../etc"}')
    with pytest.raises(BadRequestError):
        await pm.request(s.SM_SOFTWARE_LOAD, b'{"dtype": "boardA", "release_counter": "latest"}')
    with pytest.raises(BadRequestError):
        await pm.request(s.SM_SOFTWARE_LOAD, b"not json")


async def test_only_allowed_modules_reach_sm(running: tuple[SmEnv, SmService, Events], memory_hub: MemoryHub) -> None:
    with pytest.raises(PermissionDeniedError):
        await SmClient(memory_hub.bus("km")).list(DTYPE)
    with pytest.raises(PermissionDeniedError):
        await memory_hub.bus("pm").publish(SM_NOTIFY, b'{"dtype":"boardA"}')


async def test_notification_for_an_unmanaged_dtype_or_garbage_is_ignored(
    running: tuple[SmEnv, SmService, Events], memory_hub: MemoryHub
) -> None:
    env, _service, events = running
    assert (await events.next()).kind == "checked"
    admin = memory_hub.bus("admin")
    await admin.publish(SM_NOTIFY, b'{"dtype":"boardZ"}')
    await admin.publish(SM_NOTIFY, b"\xff")
    env.publish(3)
    await admin.publish(SM_NOTIFY, b'{"dtype":"boardA"}')
    ev = await events.next()  # the next event is the managed dtype's check, nothing before it
    assert (ev.kind, ev.dtype) == ("stored", DTYPE)


async def test_sm_checks_the_operation_mode_itself(tmp_path: Path, memory_hub: MemoryHub) -> None:
    """Issue 11: sm checks the mode like km, pm and cm. Outside its modes (here
    provisioning-certificate, where Table 1 turns sm off) it answers pm with ``wrong_mode`` and
    publishes a ``refused`` event instead of contacting the repository; in provisioning-software it
    serves pm but does not reach out; in software-management it does both."""
    owner = await memory_hub.bus(s.SUPERVISOR).key_value(s.MODE_BUCKET, create=True)

    async def set_mode(mode: Mode) -> None:
        await put_mode(owner, mode)

    await set_mode(Mode.PROVISIONING_CERTIFICATE)
    env = make_env(tmp_path)
    env.publish(3)
    bus = memory_hub.bus("sm")
    guard = ModeGuard(bus, verifier())
    service = SmService(env.manager(), bus, dtypes=[DTYPE], poll_interval=None, guard=guard)
    events = Events()
    await memory_hub.bus("admin").subscribe(f"{s.EVENTS}.sm.>", events.handler)
    pm = SmClient(memory_hub.bus("pm"))
    await service.start()
    try:
        ev = await events.next()
        assert (ev.kind, ev.code, ev.field) == ("refused", "wrong_mode", "mode")
        assert ev.message is not None
        assert "provisioning-certificate" in ev.message
        with pytest.raises(ModeError, match="provisioning-certificate"):
            await pm.list(DTYPE)
        with pytest.raises(ModeError):
            await pm.load(DTYPE)
        assert env.fetcher.urls == []  # sm never reached out

        await set_mode(Mode.PROVISIONING_SOFTWARE)
        await guard.wait_for(Mode.PROVISIONING_SOFTWARE)
        assert await pm.list(DTYPE) == []  # serves pm
        service.trigger(DTYPE)
        assert (await events.next()).code == "wrong_mode"  # but does not reach out
        assert env.fetcher.urls == []

        await set_mode(Mode.SOFTWARE_MANAGEMENT)
        await guard.wait_for(Mode.SOFTWARE_MANAGEMENT)
        service.trigger(DTYPE)
        ev = await events.next()
        assert (ev.kind, ev.release_counter) == ("stored", 3)
        assert [v.release_counter for v in await pm.list(DTYPE)] == [3]
    finally:
        await service.stop()
