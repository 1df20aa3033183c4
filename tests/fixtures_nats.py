"""NATS fixtures (real nats-server on a random loopback port, and the in-memory bus).

- ``nats_server``: a fresh nats-server per test, one user per module of ``subjects.MODULES``;
  yields a :class:`RunningNats` (``.url``, ``.users[module]``, ``.server``).
- ``nats_server_module``: the same, shared by the tests of one module (faster; do not kill it).
- ``nats_bus_factory``: ``await nats_bus_factory("km")`` connects a NatsBus as km on
  ``nats_server``; every bus it made is closed at teardown.
- ``memory_hub``: a :class:`MemoryHub` enforcing the permission table.

Tests that use a real server carry ``@pytest.mark.nats``.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from iotdlm.bus import subjects
from iotdlm.bus.memory import MemoryHub
from iotdlm.bus.nats import NatsBus, connect
from iotdlm.bus.server import EmbeddedNatsServer, NatsServerConfig, NatsUser, free_port, generate_users


@dataclass
class RunningNats:
    server: EmbeddedNatsServer
    users: dict[str, NatsUser]

    @property
    def url(self) -> str:
        return self.server.url

    async def connect(self, module: str, **kwargs: Any) -> NatsBus:
        u = self.users[module]
        return await connect(self.url, module=module, user=u.user, password=u.password, **kwargs)


def start_nats(
    directory: Path, users: list[NatsUser] | None = None, *, client_tls: ssl.SSLContext | None = None, **config: Any
) -> RunningNats:
    """Start an embedded nats-server in ``directory`` on a free loopback port (a few tries if
    the port was taken between picking and binding). Stop it with ``.server.stop()``.
    ``client_tls``: what reads the greeting of a TLS server that verifies clients."""
    users = users if users is not None else generate_users(subjects.MODULES)
    last: RuntimeError | None = None
    for _ in range(3):
        cfg = NatsServerConfig(port=free_port(), users=users, **config)
        server = EmbeddedNatsServer(cfg, directory / "nats.conf", client_tls=client_tls)
        try:
            server.start()
        except RuntimeError as e:
            if "address already in use" not in str(e).lower():
                raise
            last = e
            continue
        return RunningNats(server=server, users={u.module: u for u in users})
    assert last is not None
    raise last


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[RunningNats]:
    running = start_nats(tmp_path)
    try:
        yield running
    finally:
        running.server.stop()


@pytest.fixture(scope="module")
def nats_server_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNats]:
    running = start_nats(tmp_path_factory.mktemp("nats"))
    try:
        yield running
    finally:
        running.server.stop()


NatsBusFactory = Callable[..., Awaitable[NatsBus]]


@pytest.fixture
async def nats_bus_factory(nats_server: RunningNats) -> AsyncIterator[NatsBusFactory]:
    made: list[NatsBus] = []

    async def factory(module: str, **kwargs: Any) -> NatsBus:
        bus = await nats_server.connect(module, **kwargs)
        made.append(bus)
        return bus

    try:
        yield factory
    finally:
        for bus in made:
            await bus.close()


@pytest.fixture
def memory_hub() -> MemoryHub:
    return MemoryHub()
