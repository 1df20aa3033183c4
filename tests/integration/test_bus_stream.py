"""The append-only stream part of the bus contract (Bus.append_only_stream), on the in-memory hub
and on real NATS (a JetStream stream with deny_delete and deny_purge): the audit log's third anchor
(docs/adr/0005-audit-anchors.md). Who may do what on it is checked verb by verb, over the real
server, in test_jetstream_permissions_matrix.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from iotdlm import errors
from iotdlm.bus import subjects as s
from iotdlm.bus.api import Bus, StreamEntry
from iotdlm.bus.memory import MemoryBus, MemoryHub
from iotdlm.bus.server import generate_users
from tests.fixtures_nats import RunningNats, start_nats

MakeBus = Callable[..., Awaitable[Bus]]
NAME, SUBJECT = s.AUDIT_HEADS_STREAM, s.AUDIT_TREE_HEAD


@pytest.fixture
def js_server(tmp_path: Path) -> Iterator[RunningNats]:
    running = start_nats(tmp_path, users=generate_users([*s.MODULES, s.SUPERVISOR]), jetstream_dir=tmp_path / "js")
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
        bus: Bus = MemoryBus(backend, module) if isinstance(backend, MemoryHub) else await backend.connect(module)
        made.append(bus)
        return bus

    try:
        yield factory
    finally:
        for bus in made:
            await bus.close()


async def test_km_appends_admin_reads_in_order(make_bus: MakeBus) -> None:
    await (await make_bus(s.SUPERVISOR)).append_only_stream(NAME, SUBJECT, create=True)
    km = await (await make_bus("km")).append_only_stream(NAME, SUBJECT)
    seqs = [await km.append(f"head {i}".encode()) for i in range(150)]  # more than one read window
    assert seqs == list(range(1, 151))
    admin = await (await make_bus("admin")).append_only_stream(NAME, SUBJECT)
    got = await admin.read()
    assert got == [StreamEntry(seq=i + 1, data=f"head {i}".encode()) for i in range(150)]
    # the supervisor making it again (the next `iotdlm up`) keeps what it holds
    await (await make_bus(s.SUPERVISOR)).append_only_stream(NAME, SUBJECT, create=True)
    assert len(await admin.read()) == 150


async def test_only_km_appends_only_admin_reads_only_the_supervisor_creates(make_bus: MakeBus) -> None:
    await (await make_bus(s.SUPERVISOR)).append_only_stream(NAME, SUBJECT, create=True)
    for module in ("pm", "sm", "cm", "admin", s.SUPERVISOR):
        stream = await (await make_bus(module)).append_only_stream(NAME, SUBJECT)
        with pytest.raises(errors.PermissionDeniedError):
            await stream.append(b"forged head")
    for module in ("km", "pm", "sm", "cm"):
        bus = await make_bus(module)
        with pytest.raises(errors.PermissionDeniedError):
            await (await bus.append_only_stream(NAME, SUBJECT)).read()
        with pytest.raises(errors.PermissionDeniedError):
            await bus.append_only_stream(NAME, SUBJECT, create=True)
    assert await (await (await make_bus("admin")).append_only_stream(NAME, SUBJECT)).read() == []


async def test_appending_before_the_supervisor_made_the_stream_is_not_found(make_bus: MakeBus) -> None:
    km = await (await make_bus("km")).append_only_stream(NAME, SUBJECT)
    with pytest.raises((errors.NotFoundError, errors.UnavailableError)):
        await km.append(b"head")


@pytest.mark.nats
async def test_the_stream_denies_delete_and_purge_and_keeps_everything(js_server: RunningNats) -> None:
    """The server holds the stream to it: deny_delete, deny_purge, no age or size limit, on disk."""
    owner = await js_server.connect(s.SUPERVISOR)
    admin = await js_server.connect("admin")
    try:
        await owner.append_only_stream(NAME, SUBJECT, create=True)
        info = json.loads(await admin.request(f"$JS.API.STREAM.INFO.{NAME}", b"", timeout=5))
        cfg = info["config"]
        assert (cfg["deny_delete"], cfg["deny_purge"], cfg["max_age"], cfg["storage"]) == (True, True, 0, "file")
        assert cfg["subjects"] == [SUBJECT]
        assert (cfg["max_msgs"], cfg["max_bytes"]) == (-1, -1)
    finally:
        await owner.close()
        await admin.close()


@pytest.mark.nats
async def test_a_stream_that_is_not_append_only_is_refused(tmp_path: Path) -> None:
    """A stream of that name made by someone else (here: a server where every user may do all of
    JetStream) without deny_delete is reported, not taken as the anchor."""
    # the permission table grants nobody STREAM.CREATE with another config than ours, so make one
    # on a server without authorization
    bare = start_nats(tmp_path / "bare", users=[], jetstream_dir=tmp_path / "bare-js")
    try:
        from iotdlm.bus.nats import connect

        raw = await connect(bare.url, module=s.SUPERVISOR)
        try:
            weak = {"name": NAME, "subjects": [SUBJECT], "storage": "file", "deny_delete": False}
            await raw.request(f"$JS.API.STREAM.CREATE.{NAME}", json.dumps(weak).encode(), timeout=5)
            with pytest.raises(errors.ConflictError, match="not append-only: message delete is allowed"):
                await raw.append_only_stream(NAME, SUBJECT, create=True)
        finally:
            await raw.close()
    finally:
        bare.server.stop()
