"""A deployment's own embedded NATS server, plain and over TLS, with km answering through it."""

from __future__ import annotations

import ssl

import pytest

from iotdlm.bus.server import free_port
from iotdlm.client.km import KmClient
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment, init_deployment
from iotdlm.errors import UnavailableError
from iotdlm.km import KmService
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.runtime import (
    build_km,
    connect_identity,
    km_identity,
    km_on_loop,
    km_trust,
    nats_server,
    open_store,
    sealer_for,
)
from tests.helpers import make_csr


@pytest.mark.nats
@pytest.mark.parametrize("tls", [False, pytest.param(True, marks=pytest.mark.real_clock)], ids=["plain", "tls"])
async def test_deployment_nats_and_km(tmp_path, tls: bool) -> None:
    clock = SystemClock()
    dep, _ = init_deployment(
        tmp_path / "d",
        organization="T",
        algorithm=Algorithm.P256,
        dtypes=["b"],
        passphrase=b"pw",
        nats_port=free_port(),
        nats_tls=tls,
        now=clock.now(),
    )
    dep = Deployment.load(dep.root)  # what a separate process would see
    assert dep.nats_url.startswith("tls://" if tls else "nats://")
    server = nats_server(dep)
    server.start()
    store = open_store(dep)
    try:
        km_bus, _ = await connect_identity(dep, "km")
        on_loop = km_on_loop(dep, store)
        assert on_loop  # a SQLite store, CA keys in files: km serve answers single requests on its loop
        km = build_km(dep, store, clock, passphrase=b"pw")
        service = KmService(km, km_bus, identity=km_identity(dep), on_loop=on_loop)
        await service.start()
        pm_bus, pm = await connect_identity(dep, "pm-b")
        out = await KmClient(pm_bus, sealer_for(pm), clock, trust=km_trust(dep)).issue(
            "dev-1", "operational", csr=make_csr(generate_key(Algorithm.P256), "dev-1")
        )
        assert out.issuer == "operational"
        if tls:
            # without a client certificate (and without TLS) the server does not let us in
            from iotdlm.bus.nats import connect

            ident = dep.identity("sm")
            with pytest.raises(UnavailableError):
                await connect(
                    dep.nats_url.replace("tls://", "nats://"),
                    module="sm",
                    user=ident.nats.user,
                    password=ident.nats.password,
                    connect_timeout=2,
                )
            no_client_cert = ssl.create_default_context(cafile=str(dep.root / "ca" / "root.pem"))
            with pytest.raises(UnavailableError):
                await connect(
                    dep.nats_url,
                    module="sm",
                    user=ident.nats.user,
                    password=ident.nats.password,
                    tls=no_client_cert,
                    connect_timeout=2,
                )
            sm_bus = await connect(
                dep.nats_url,
                module="sm",
                user=ident.nats.user,
                password=ident.nats.password,
                tls=dep.client_tls(ident),
                connect_timeout=2,
            )
            await sm_bus.close()
        await service.stop()
        await pm_bus.close()
        await km_bus.close()
    finally:
        store.close()
        server.stop()


@pytest.mark.nats
@pytest.mark.real_clock
async def test_supervisor_starts_a_tls_first_server_and_reads_its_greeting_over_tls(tmp_path) -> None:
    """`iotdlm up` with `[nats] tls = true`: the supervisor's nats-server speaks TLS first and verifies
    clients, so its greeting (the random name of this start) is read over TLS with the modes
    certificate; a module then connects (TLS first) and a plain-text client is cut off."""
    import asyncio

    from iotdlm.supervisor.supervisor import NatsProcess

    clock = SystemClock()
    dep, _ = init_deployment(
        tmp_path / "d",
        organization="T",
        algorithm=Algorithm.P256,
        dtypes=["b"],
        passphrase=b"pw",
        nats_port=free_port(),
        nats_tls=True,
        now=clock.now(),
    )
    dep = Deployment.load(dep.root)
    proc = NatsProcess(nats_server(dep))
    await proc.start()
    try:
        assert "handshake_first: true" in proc.server.config_path.read_text()
        bus, _ = await connect_identity(dep, "sm")
        await bus.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", dep.config.nats.port)
        try:
            writer.write(b'CONNECT {"user":"sm"}\r\nPING\r\n')
            await writer.drain()
            assert await asyncio.wait_for(reader.read(4096), 10) == b""  # no INFO, no PONG: closed
        finally:
            writer.close()
    finally:
        await proc.stop()
