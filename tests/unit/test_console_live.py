"""The console's Software page and its live pages (issue 18, the rest), without a browser: what sm
holds and whether it verifies, the pages that reload themselves (only those), their progress; the
console in `iotdlm status`, and its port taken before anything else starts."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm.bus.memory import MemoryHub
from iotdlm.bus.server import free_port
from iotdlm.clock import FixedClock
from iotdlm.console.app import make_app
from iotdlm.console.backend import LiveBackend, SoftwareView, TransferView
from iotdlm.deployment import ConsoleSettings
from iotdlm.errors import BadRequestError, UnavailableError
from iotdlm.store.transfer import TransferRecord
from iotdlm.wire import modes as m
from iotdlm.wire import software as sw
from tests.helpers import NOW
from tests.unit.test_console_pages import ADMIN, AS_ADMIN, Env, FakeBackend, _peer

SHA = "ab" * 32


def _release(counter: int, problem: str | None = None) -> sw.HeldRelease:
    return sw.HeldRelease(
        dtype="board-a", release_counter=counter, target_path="board-a/fw.bin", length=123_456, sha256=SHA,
        stored_at="2026-11-21T12:00:00Z", sig_sm="failed" if problem else "verified", problem=problem,
    )  # fmt: skip


@pytest.fixture
async def live() -> AsyncIterator[Env]:
    backend = FakeBackend()
    async with TestClient(
        TestServer(make_app(backend, ADMIN.cert, FixedClock(NOW), peer=_peer), host="127.0.0.1")
    ) as c:
        yield c, backend


async def _page(env: Env, path: str) -> str:
    client, _ = env
    resp = await client.get(path, headers=AS_ADMIN)
    assert resp.status == 200
    return await resp.text()


async def test_the_software_page_lists_what_sm_holds_and_what_no_longer_verifies(live: Env) -> None:
    _, backend = live
    backend.held = SoftwareView(
        sw.HeldResponse(
            releases=[_release(3), _release(4, "sig_sm does not verify (untrusted, sig_sm)")],
            checked_at={"board-a": "2026-11-21T12:30:00Z"},
        )
    )
    page = await _page(live, "/software")
    assert "Software releases held by sm" in page
    assert page.count(SHA) == 2
    assert re.search(r'class="valid sig-sm">verified', page)
    assert "sig_sm does not verify (untrusted, sig_sm). pm will refuse it" in page
    assert "board-a at 2026-11-21T12:30:00Z" in page
    assert "123,456" in page
    assert "http-equiv" not in page  # only the live pages reload themselves


async def test_the_software_page_says_when_sm_is_not_running(live: Env) -> None:
    page = await _page(live, "/software")
    assert "sm did not answer (no responders)" in page
    assert "software-management" in page
    _, backend = live
    backend.held = SoftwareView(sw.HeldResponse(releases=[]))
    assert "sm holds no release yet" in await _page(live, "/software")


async def test_provisioning_reloads_itself_and_shows_its_progress(live: Env) -> None:
    page = await _page(live, "/provisioning")
    assert '<meta http-equiv="refresh" content="5; url=/provisioning">' in page
    assert f'datetime="{NOW.isoformat()}"' in page
    # the fake pm: 3 complete, 1 failed
    assert re.search(r'<progress max="4" value="3" aria-label="pm-board-a: devices complete">', page)
    assert "3 of 4 (75%)" in page


async def test_transfers_reload_themselves_and_show_each_transfer_s_progress(live: Env) -> None:
    _, backend = live
    rec = TransferRecord("sp1", "t" * 16, "sending", NOW, NOW)
    backend.transfer_views = [
        TransferView("sp1", rec, {"pending": 5, "reset": 2, "enrolled": 2, "revoked-at-CA1": 1}, 0)
    ]
    page = await _page(live, "/transfers")
    assert '<meta http-equiv="refresh" content="5; url=/transfers">' in page
    assert re.search(r'<progress max="10" value="3" aria-label="transfer t{16}: devices through">', page)
    assert "3 of 10 (30%)" in page
    backend.transfer_views = []
    assert "No transfer here." in await _page(live, "/transfers")


async def test_no_other_page_reloads_itself(live: Env) -> None:
    for path in ("/fleet", "/mode", "/cas", "/audit"):
        assert "http-equiv" not in await _page(live, path)


# --- the console beside the others: `iotdlm status`, a taken port -----------------------------------
def _status_with(console: m.ServiceHealth | None) -> m.StatusReply:
    return m.StatusReply(
        mode="certificate-management", since="2026-11-21T12:00:00Z", by="ops", with_sm=False, supervisor_pid=1,
        nats_url="nats://127.0.0.1:1", switching=None, services=[], console=console,
        console_url="https://127.0.0.1:8444/" if console is not None else None,
    )  # fmt: skip


@pytest.mark.parametrize("state", ["running", "failed"])
def test_status_names_the_console_its_address_and_state(state: str) -> None:
    from iotdlm.cli.common import console
    from iotdlm.cli.modes import _print_status

    row = m.ServiceHealth(
        name="console", module="console", dtype=None, state=state, pid=42 if state == "running" else None,
        running=state == "running", restarts=2, uptime=None, last_exit=None if state == "running" else 3,
        log="/d/logs/console.log", last_error=None if state == "running" else "cannot listen on 127.0.0.1:8444",
    )  # fmt: skip
    with console.capture() as cap:
        _print_status(_status_with(row), Path("/d"))
    out = " ".join(cap.get().split())
    assert f"console: https://127.0.0.1:8444/ ({state};" in out
    assert ("The console stays off" in out) is (state == "failed")
    assert ("set [console] port in /d/iotdlm.toml" in out) is (state == "failed")
    with console.capture() as cap:
        _print_status(_status_with(None), Path("/d"))
    assert "console: not started" in " ".join(cap.get().split())


def test_the_console_takes_its_port_first_and_names_the_setting(tmp_path: Path) -> None:
    from iotdlm.console.service import bind

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        dep = SimpleNamespace(root=tmp_path, config=SimpleNamespace(console=ConsoleSettings(port=port)))
        with pytest.raises(UnavailableError) as got:
            bind(dep)  # type: ignore[arg-type]
    assert f"cannot listen on 127.0.0.1:{port}" in got.value.message
    assert f"{tmp_path / 'iotdlm.toml'}'s [console] table" in got.value.message
    assert got.value.field == "console.port"
    dep = SimpleNamespace(root=tmp_path, config=SimpleNamespace(console=ConsoleSettings(port=free_port())))
    bind(dep).close()  # type: ignore[arg-type]


async def test_the_live_backend_asks_sm_as_the_admin_identity(tmp_path: Path, memory_hub: MemoryHub) -> None:
    """LiveBackend.software on the in-memory bus (permissions as nats-server enforces them): a note
    while no sm answers, then what sm holds, verified by sm."""
    from iotdlm.sm.service import SmService
    from tests.unit.test_sm_updater import DTYPE, make_env

    backend = LiveBackend(dep=None, store=None, bus=memory_hub.bus("admin"), km=None, clock=None)  # type: ignore[arg-type]
    view = await backend.software()
    assert view.held is None
    assert view.note is not None
    assert view.note.startswith("sm did not answer (")
    env = make_env(tmp_path)
    env.publish(2)
    service = SmService(env.manager(), memory_hub.bus("sm"), dtypes=[DTYPE], poll_interval=None)
    await service.start()  # its first check stores release 2
    try:
        for _ in range(200):
            view = await backend.software()
            if view.held is not None and view.held.releases:
                break
            await asyncio.sleep(0.05)
        assert view.held is not None
        assert [(r.dtype, r.release_counter, r.sig_sm) for r in view.held.releases] == [(DTYPE, 2, "verified")]
    finally:
        await service.stop()


# --- sm.software.held on the wire: any bytes decode or are refused in words --------------------------
@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.dictionaries(
            st.sampled_from(["dtype", "x", "releases", "checked_at"]), st.from_type(object), max_size=3
        ).map(lambda d: msgspec.json.encode(d, enc_hook=repr)),
    )
)
def test_held_messages_decode_or_are_refused(data: bytes) -> None:
    for cls in (sw.HeldRequest, sw.HeldResponse):
        refused: BadRequestError | None = None
        try:
            out = sw.decode(data, cls)
        except BadRequestError as exc:
            refused = exc
        if refused is not None:
            assert refused.message  # in words, never a traceback
        else:
            assert isinstance(out, cls)


def test_held_request_refuses_a_dtype_that_is_a_path() -> None:
    with pytest.raises(BadRequestError, match="dtype"):
        sw.decode(b'{"dtype": "../sm"}', sw.HeldRequest)
    assert sw.decode(b"{}", sw.HeldRequest).dtype is None
