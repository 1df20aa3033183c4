"""The key-value part of the bus contract (Bus.key_value), on the in-memory hub and on real NATS
(JetStream key-value), plus the narrowed JetStream permissions on a real server."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from iotdlm import errors
from iotdlm.bus import subjects
from iotdlm.bus.api import Bus, KeyValueEntry
from iotdlm.bus.memory import MemoryBus, MemoryHub
from iotdlm.bus.nats import connect
from iotdlm.bus.server import (
    JETSTREAM_API,
    NatsServerConfig,
    find_nats_server,
    free_port,
    generate_users,
    render_config,
)
from tests.fixtures_nats import RunningNats, start_nats

MakeBus = Callable[..., Awaitable[Bus]]
BUCKET = subjects.MODE_BUCKET
OWNER = subjects.SUPERVISOR
#: guard against hangs only; no assertion depends on how long anything takes
WAIT = 10.0


def _users() -> list[Any]:
    return generate_users([*subjects.MODULES, subjects.SUPERVISOR])


@pytest.fixture
def js_server(tmp_path: Path) -> Iterator[RunningNats]:
    running = start_nats(tmp_path, users=_users(), jetstream_dir=tmp_path / "js")
    try:
        yield running
    finally:
        running.server.stop()


@pytest.fixture(params=["memory", pytest.param("nats", marks=pytest.mark.nats)])
def backend(request: pytest.FixtureRequest) -> MemoryHub | RunningNats:
    if request.param == "nats":
        running: RunningNats = request.getfixturevalue("js_server")
        return running
    return MemoryHub()


@pytest.fixture
async def make_bus(backend: MemoryHub | RunningNats) -> AsyncIterator[MakeBus]:
    made: list[Bus] = []

    async def factory(module: str, **kwargs: Any) -> Bus:
        bus: Bus
        if isinstance(backend, MemoryHub):
            bus = MemoryBus(backend, module, **kwargs)
        else:
            bus = await backend.connect(module, **kwargs)
        made.append(bus)
        return bus

    try:
        yield factory
    finally:
        for bus in made:
            await bus.close()


class _Seen:
    """A watch handler that records what it gets; ``until`` waits for a condition."""

    def __init__(self) -> None:
        self.items: list[KeyValueEntry | None] = []
        self._changed = asyncio.Event()

    async def __call__(self, entry: KeyValueEntry | None) -> None:
        self.items.append(entry)
        self._changed.set()

    async def until(self, cond: Callable[[list[KeyValueEntry | None]], bool]) -> None:
        async def wait() -> None:
            while not cond(self.items):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), WAIT)

    def values(self) -> list[bytes | None]:
        return [None if e is None else e.value for e in self.items]


async def test_put_get_delete_round_trip(make_bus: MakeBus) -> None:
    owner = await make_bus(OWNER)
    kv = await owner.key_value(BUCKET, create=True)
    assert kv.bucket == BUCKET
    assert await kv.get("mode") is None
    r1 = await kv.put("mode", b'{"mode":"a"}')
    r2 = await kv.put("mode", b'{"mode":"b"}')
    assert r2 > r1 >= 1
    got = await kv.get("mode")
    assert got == KeyValueEntry(key="mode", value=b'{"mode":"b"}', revision=r2)
    await kv.delete("mode")
    assert await kv.get("mode") is None
    assert await kv.put("mode", b"") > r2
    entry = await kv.get("mode")
    assert entry is not None
    assert entry.value == b""


async def test_every_module_reads_what_the_owner_wrote(make_bus: MakeBus) -> None:
    owner = await make_bus(OWNER)
    kv = await owner.key_value(BUCKET, create=True)
    await kv.put("mode", b"provisioning-certificate")
    for module in subjects.MODULES:
        bus = await make_bus(module)
        reader = await bus.key_value(BUCKET)
        entry = await reader.get("mode")
        assert entry is not None
        assert entry.value == b"provisioning-certificate", module


async def test_create_is_idempotent_and_keeps_values(make_bus: MakeBus) -> None:
    owner = await make_bus(OWNER)
    kv = await owner.key_value(BUCKET, create=True)
    await kv.put("mode", b"x")
    again = await owner.key_value(BUCKET, create=True)
    entry = await again.get("mode")
    assert entry is not None
    assert entry.value == b"x"


async def test_missing_bucket_is_not_found(make_bus: MakeBus) -> None:
    km = await make_bus("km")
    with pytest.raises(errors.NotFoundError):
        await km.key_value(BUCKET)


@pytest.mark.parametrize("module", subjects.MODULES)
async def test_only_the_owner_may_write(make_bus: MakeBus, module: str) -> None:
    owner = await make_bus(OWNER)
    kv = await owner.key_value(BUCKET, create=True)
    await kv.put("mode", b"good")
    bus = await make_bus(module)
    theirs = await bus.key_value(BUCKET)
    with pytest.raises(errors.PermissionDeniedError) as info:
        await theirs.put("mode", b"forged")
    assert f"$kv.{BUCKET}.mode" in info.value.message.lower()
    with pytest.raises(errors.PermissionDeniedError):
        await theirs.delete("mode")
    entry = await kv.get("mode")
    assert entry is not None
    assert entry.value == b"good"


async def test_watch_sees_current_value_then_every_change_in_order(make_bus: MakeBus) -> None:
    owner = await make_bus(OWNER)
    kv = await owner.key_value(BUCKET, create=True)
    pm = await make_bus("pm")
    reader = await pm.key_value(BUCKET)

    empty = _Seen()
    sub_empty = await reader.watch("mode", empty)
    await empty.until(lambda items: len(items) >= 1)
    assert empty.items == [None]  # no value yet

    await kv.put("mode", b"one")
    await empty.until(lambda items: len(items) >= 2)
    late = _Seen()
    sub_late = await reader.watch("mode", late)
    await late.until(lambda items: len(items) >= 1)
    assert late.values() == [b"one"]  # the current value first, not "no value"

    # each write is waited for before the next: a value overwritten before a watch was handed it
    # may be skipped (one value per key; see test_a_watch_ends_at_the_latest_value)
    await kv.put("other", b"not watched")
    await kv.put("mode", b"two")
    await empty.until(lambda items: len(items) >= 3)
    await late.until(lambda items: len(items) >= 2)
    await kv.delete("mode")
    await empty.until(lambda items: len(items) >= 4)
    await late.until(lambda items: len(items) >= 3)
    await kv.put("mode", b"three")
    await empty.until(lambda items: len(items) >= 5)
    await late.until(lambda items: len(items) >= 4)
    assert empty.values() == [None, b"one", b"two", None, b"three"]
    assert late.values() == [b"one", b"two", None, b"three"]
    revisions = [e.revision for e in empty.items if e is not None]
    assert revisions == sorted(revisions)
    assert all(e.key == "mode" for e in empty.items if e is not None)

    await sub_empty.unsubscribe()
    await kv.put("mode", b"four")
    await late.until(lambda items: len(items) >= 5)
    assert empty.values() == [None, b"one", b"two", None, b"three"]  # unsubscribed: nothing more
    await sub_late.unsubscribe()


async def test_a_failing_watch_handler_is_logged_and_the_watch_goes_on(
    make_bus: MakeBus, caplog: pytest.LogCaptureFixture
) -> None:
    owner = await make_bus(OWNER)
    kv = await owner.key_value(BUCKET, create=True)
    seen = _Seen()

    async def handler(entry: KeyValueEntry | None) -> None:
        await seen(entry)
        if entry is not None and entry.value == b"boom":
            raise RuntimeError("handler bug")

    with caplog.at_level(logging.ERROR):
        await kv.watch("mode", handler)
        await kv.put("mode", b"boom")
        await seen.until(lambda items: len(items) >= 2)  # the handler failed on "boom"
        await kv.put("mode", b"fine")
        await seen.until(lambda items: len(items) >= 3)
    assert seen.values() == [None, b"boom", b"fine"]
    assert any("watch handler" in r.getMessage() for r in caplog.records)


async def test_a_watch_ends_at_the_latest_value(make_bus: MakeBus) -> None:
    """Writes faster than the watch is handed them: some may be skipped (one value per key), but
    what arrives is in order of revision and the last thing seen is the latest value."""
    owner = await make_bus(OWNER)
    kv = await owner.key_value(BUCKET, create=True)
    reader = await (await make_bus("pm")).key_value(BUCKET)
    seen = _Seen()
    await reader.watch("mode", seen)
    await seen.until(lambda items: len(items) >= 1)
    written = [f"v{i}".encode() for i in range(40)]
    for value in written:
        await kv.put("mode", value)
    await seen.until(lambda items: bool(items) and items[-1] is not None and items[-1].value == written[-1])
    got = [e for e in seen.items if e is not None]
    assert [e.revision for e in got] == sorted({e.revision for e in got})  # in order, none twice
    assert [written.index(e.value) for e in got] == sorted(written.index(e.value) for e in got)
    assert got[-1].revision == (await kv.get("mode")).revision  # type: ignore[union-attr]


async def test_closing_the_bus_ends_its_watches(make_bus: MakeBus) -> None:
    owner = await make_bus(OWNER)
    kv = await owner.key_value(BUCKET, create=True)
    km = await make_bus("km")
    seen = _Seen()
    await (await km.key_value(BUCKET)).watch("mode", seen)
    await seen.until(lambda items: len(items) >= 1)
    await km.close()
    await kv.put("mode", b"after close")
    # a later watch on a live bus sees the write; the closed one got nothing more
    probe = _Seen()
    await kv.watch("mode", probe)
    await probe.until(lambda items: len(items) >= 1)
    assert seen.items == [None]
    with pytest.raises(errors.UnavailableError):
        await km.key_value(BUCKET)


@pytest.mark.parametrize(
    ("bucket", "key"),
    [("bad bucket", "mode"), ("", "mode"), ("b.c", "mode"), (BUCKET, ""), (BUCKET, ".mode"), (BUCKET, "a b")],
)
async def test_bad_names_are_programming_errors(make_bus: MakeBus, bucket: str, key: str) -> None:
    owner = await make_bus(OWNER)
    if bucket != BUCKET:
        with pytest.raises(ValueError, match="bucket"):
            await owner.key_value(bucket, create=True)
        return
    kv = await owner.key_value(bucket, create=True)
    with pytest.raises(ValueError, match="key"):
        await kv.put(key, b"x")
    with pytest.raises(ValueError, match="key"):
        await kv.get(key)


async def test_memory_hub_enforces_the_read_permission() -> None:
    hub = MemoryHub(
        permissions={
            **subjects.PERMISSIONS,
            "km": subjects.Permissions(publish=(), subscribe=(), allow_responses=False),  # no jetstream
        }
    )
    owner = MemoryBus(hub, OWNER)
    await owner.key_value(BUCKET, create=True)
    km = MemoryBus(hub, "km")
    with pytest.raises(errors.PermissionDeniedError):
        await km.key_value(BUCKET)
    pm = MemoryBus(hub, "pm")
    with pytest.raises(errors.PermissionDeniedError):
        await pm.key_value(BUCKET, create=True)  # readers may not create the bucket
    for bus in (owner, km, pm):
        await bus.close()


# --- real NATS only ---------------------------------------------------------------------------


@pytest.mark.nats
async def test_without_jetstream_the_bucket_is_unavailable(tmp_path: Path) -> None:
    running = start_nats(tmp_path, users=[])  # no JetStream, no authorization: nobody answers
    bus = await connect(running.url, module="km")
    try:
        with pytest.raises(errors.UnavailableError, match="JetStream"):
            await bus.key_value(BUCKET)
    finally:
        await bus.close()
        running.server.stop()


@pytest.mark.nats
async def test_the_value_survives_a_server_restart(tmp_path: Path) -> None:
    users = _users()
    running = start_nats(tmp_path, users=users, jetstream_dir=tmp_path / "js")
    try:
        owner = await running.connect(OWNER)
        await (await owner.key_value(BUCKET, create=True)).put("mode", b"kept")
        await owner.close()
        running.server.stop()
        running.server.start()
        km = await running.connect("km")
        entry = await (await km.key_value(BUCKET)).get("mode")
        await km.close()
    finally:
        running.server.stop()
    assert entry is not None
    assert entry.value == b"kept"


def _narrowed_config(cfg: NatsServerConfig) -> str:
    """The embedded server's config: each user's own ``Permissions.jetstream`` list, never
    ``$JS.API.>`` (issue 11; the render itself does it now)."""
    return render_config(cfg)


@pytest.mark.nats
async def test_narrowed_jetstream_permissions_are_enough_and_refuse_the_rest(tmp_path: Path) -> None:
    users = _users()
    by_module = {u.module: u for u in users}
    cfg = NatsServerConfig(port=free_port(), users=users, jetstream_dir=tmp_path / "js")
    conf = tmp_path / "narrow.conf"
    conf.write_text(_narrowed_config(cfg))
    assert JETSTREAM_API not in conf.read_text()
    proc = await asyncio.create_subprocess_exec(
        find_nats_server(), "-c", str(conf), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"nats://127.0.0.1:{cfg.port}"
    buses: list[Bus] = []

    async def conn(module: str) -> Bus:
        u = by_module[module]
        for _ in range(200):  # the server needs a moment to listen
            try:
                bus = await connect(url, module=module, user=u.user, password=u.password, connect_timeout=1)
            except errors.UnavailableError:
                await asyncio.sleep(0.05)
                continue
            buses.append(bus)
            return bus
        raise AssertionError("nats-server did not start")

    try:
        owner = await conn(OWNER)
        kv = await owner.key_value(BUCKET, create=True)
        await kv.put("mode", b"narrow")
        km = await conn("km")
        reader = await km.key_value(BUCKET)
        entry = await reader.get("mode")
        assert entry is not None
        assert entry.value == b"narrow"
        seen = _Seen()
        await reader.watch("mode", seen)
        await seen.until(lambda items: len(items) >= 1)
        await kv.put("mode", b"changed")
        await seen.until(lambda items: len(items) >= 2)
        assert seen.values() == [b"narrow", b"changed"]
        with pytest.raises(errors.PermissionDeniedError):
            await reader.put("mode", b"forged")
        with pytest.raises(errors.PermissionDeniedError):
            await km.key_value("other_bucket", create=True)
    finally:
        for bus in buses:
            await bus.close()
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), WAIT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
