"""Every module against a probe subject of every module's namespace: what the permission table
forbids, the NATS server itself refuses (publish and subscribe), and what it allows goes through."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from iotdlm.bus import subjects as s
from iotdlm.bus.memory import subject_matches
from iotdlm.bus.server import generate_users
from iotdlm.errors import PermissionDeniedError
from tests.fixtures_nats import RunningNats, start_nats

PROBES = [
    s.KM_ISSUE,
    s.KM_REVOKE,
    s.KM_OCSP,
    s.KM_FACTORY_CAS,
    s.KM_EST_SIMPLEENROLL,
    s.KM_TRANSFER_PEER_CONFIRMATION,
    s.KM_TRANSFER_MESSAGE,
    s.KM_TRANSFER_EVIDENCE,
    s.SM_SOFTWARE_LOAD,
    # read-only, for the console's Software page: pm and admin may ask it; admin may not load
    s.SM_SOFTWARE_HELD,
    f"{s.PREFIX}.pm.boardA.provision",
    s.CM_PING,
    # health and metrics (issue 14): each module answers its own only; the supervisor asks all
    s.health_subject("km"),
    f"{s.health_subject('cm')}.4242",
    s.metrics_subject("sm"),
    f"{s.metrics_subject('pm')}.77",
    s.metrics_subject("cm"),
    f"{s.PREFIX}.modes.set",
    s.events("km", "revoked"),
    s.events("pm", "alarm"),
]
MODULES = [*s.MODULES, s.SUPERVISOR]


def _allowed(patterns: tuple[str, ...], subject: str) -> bool:
    return any(subject_matches(p, subject) for p in patterns)


def _may_publish(perms: s.Permissions, subject: str) -> bool:
    return _allowed(perms.publish, subject) and not _allowed(perms.deny_publish, subject)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNats]:
    running = start_nats(Path(tmp_path_factory.mktemp("perm")), users=generate_users(MODULES))
    yield running
    running.server.stop()


@pytest.mark.nats
@pytest.mark.parametrize("module", MODULES)
async def test_publish_matrix(server: RunningNats, module: str) -> None:
    bus = await server.connect(module)
    perms = s.PERMISSIONS[module]
    try:
        for subject in PROBES:
            if _may_publish(perms, subject):
                await bus.publish(subject, b"{}")  # no error: the server let it through
            else:
                with pytest.raises(PermissionDeniedError):
                    await bus.publish(subject, b"{}")
    finally:
        await bus.close()


@pytest.mark.nats
@pytest.mark.parametrize("module", MODULES)
async def test_subscribe_matrix(server: RunningNats, module: str) -> None:
    bus = await server.connect(module)
    perms = s.PERMISSIONS[module]

    async def handler(_m: object) -> None:
        return None

    try:
        for subject in PROBES:
            if _allowed(perms.subscribe, subject):
                sub = await bus.subscribe(subject, handler)  # type: ignore[arg-type]
                await sub.unsubscribe()
            else:
                with pytest.raises(PermissionDeniedError):
                    await bus.subscribe(subject, handler)  # type: ignore[arg-type]
    finally:
        await bus.close()


def test_the_matrix_is_not_trivial() -> None:
    """Each module is refused something among the probes (the operator's admin may publish
    anything, but may subscribe only to events and its inbox)."""
    for module in MODULES:
        perms = s.PERMISSIONS[module]
        refused_pub = [not _may_publish(perms, subject) for subject in PROBES]
        refused_sub = [not _allowed(perms.subscribe, subject) for subject in PROBES]
        assert any(refused_sub), module
        if module != "admin":
            assert any(refused_pub), module
    assert any(_allowed(s.PERMISSIONS["pm"].publish, x) for x in PROBES)
    admin = s.PERMISSIONS["admin"]
    assert _may_publish(admin, s.SM_SOFTWARE_HELD)
    assert not _may_publish(admin, s.SM_SOFTWARE_LOAD)
