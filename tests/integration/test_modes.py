"""The supervisor on a real deployment: embedded NATS, one OS process per service, Table 1.

The services are stand-ins (a ``python -c`` script): each connects to NATS as its module, checks
the mode with a :class:`ModeGuard`, answers ``ping`` / ``work`` / ``guarded`` on its module's
subjects, and cm also listens on a loopback TCP port -- so these tests do not depend on the real
km, sm, cm and pm. No assertion depends on how long anything takes: waits poll a condition, with a
bound that only guards against hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from iotdlm import errors
from iotdlm.bus import subjects
from iotdlm.bus.api import Bus
from iotdlm.bus.server import free_port
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment, init_deployment
from iotdlm.modes.signed import ModeVerifier
from iotdlm.modes.table import Mode, modules_on
from iotdlm.pki.keys import Algorithm
from iotdlm.runtime import connect_identity, open_store
from iotdlm.supervisor.processes import SupervisorSettings
from iotdlm.supervisor.supervisor import Supervisor, load_saved_mode
from iotdlm.wire.modes import ModeRecord, SetReply, StatusReply, decode, encode
from tests.integration.test_bus_nats import ImpostorNats

pytestmark = pytest.mark.nats

#: guard against hangs only
WAIT = 30.0
DTYPES = ["board-a", "board-b"]

STAND_IN = r"""
import asyncio, json, os, signal, sys
from pathlib import Path

from iotdlm.bus import subjects
from iotdlm.bus.nats import connect
from iotdlm.deployment import Deployment
from iotdlm.modes import DEVICE_CERTIFICATE_MODES, ModeGuard, modes_where
from iotdlm.modes.signed import ModeVerifier

data, svc, cm_port = sys.argv[1], sys.argv[2], int(sys.argv[3])
module, _, dtype = svc.partition("-")


def subject(verb):
    if module == "cm":
        return subjects.CM_PING if verb == "ping" else f"{subjects.CM_EGRESS}.{verb}"
    return ".".join([subjects.PREFIX, module, *([dtype] if dtype else []), verb])


async def main():
    dep = Deployment.load(data)
    creds = json.loads((Path(data) / "modules" / svc / "nats.json").read_text())
    bus = await connect(dep.nats_url, module=module, user=creds["user"], password=creds["password"])
    guard = ModeGuard(bus, ModeVerifier.for_deployment(dep))
    await guard.start()

    async def ping(msg):
        return json.dumps({"name": svc, "pid": os.getpid()}).encode()

    async def work(msg):
        Path(data, f"work-{svc}.started").write_text(str(os.getpid()))
        await asyncio.sleep(float(msg.data or b"1"))
        return f"done:{svc}".encode()

    async def guarded(msg):
        allowed = DEVICE_CERTIFICATE_MODES if module == "km" else modes_where(module)
        return guard.require(allowed, "the stand-in's guarded request").encode()

    # ping last: a stand-in that answers ping answers everything (the tests wait on ping alone)
    for verb, handler in (("work", work), ("guarded", guarded), ("ping", ping)):
        await bus.serve(subject(verb), handler)
    server = None
    if module == "cm":
        async def client(reader, writer):
            writer.write(b"cm\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(client, "127.0.0.1", cm_port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    if server is not None:
        server.close()
    await guard.stop()
    await bus.drain()


asyncio.run(main())
"""

FAST = SupervisorSettings(
    stop_timeout=15.0, backoff_initial=0.05, backoff_max=0.5, quick_crash=60.0, give_up_after=3, nats_check_every=0.2
)


def stand_in_commands(cm_port: int) -> dict[str, list[str]]:
    cmd = ["{python}", "-c", STAND_IN, "{data}", "{name}", str(cm_port)]
    return {module: list(cmd) for module in ("km", "sm", "cm", "pm")}


def subject(name: str, verb: str) -> str:
    module, _, dtype = name.partition("-")
    if module == "cm":
        return subjects.CM_PING if verb == "ping" else f"{subjects.CM_EGRESS}.{verb}"
    return ".".join([subjects.PREFIX, module, *([dtype] if dtype else []), verb])


def expected_names(mode: Mode, *, with_sm: bool) -> set[str]:
    out: set[str] = set()
    for module in modules_on(mode, with_sm=with_sm):
        out |= {f"pm-{d}" for d in DTYPES} if module == "pm" else {module}
    return out


ALL_NAMES = {"km", "sm", "cm", *(f"pm-{d}" for d in DTYPES)}


def stand_ins(root: Path) -> dict[str, list[int]]:
    """Service name -> pids of the live stand-in processes of the deployment at ``root`` (from /proc)."""
    out: dict[str, list[int]] = {}
    script = STAND_IN.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state == "Z" or len(argv) < 5 or argv[1] != b"-c" or argv[2] != script:
            continue
        if argv[3] == str(root).encode():
            out.setdefault(argv[4].decode(), []).append(int(entry.name))
    return out


def nats_servers(root: Path) -> list[int]:
    """Pids of live nats-server processes running the embedded config of the deployment at ``root``."""
    conf = str(root / "nats" / "nats.conf").encode()
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if conf in (entry / "cmdline").read_bytes().split(b"\0"):
                    out.append(int(entry.name))
    return out


def kill_stand_ins(root: Path) -> None:
    for pids in stand_ins(root).values():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def logs_tail(root: Path, lines: int = 15) -> str:
    """The last lines of every log of a deployment (the supervisor's, NATS's, each service's): what
    a timeout message shows, so a failure on a loaded machine says what happened."""
    out: list[str] = []
    for log in sorted([*(root / "logs").glob("*.log"), *(root / "nats").glob("*.log")]):
        with contextlib.suppress(OSError):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(tail))
    return "\n".join(out)


async def until(cond: Callable[[], bool | Awaitable[bool]], what: str, *, root: Path | None = None) -> None:
    async def poll() -> None:
        while True:
            got = cond()
            if not isinstance(got, bool):
                got = await got
            if got:
                return
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(poll(), WAIT)
    except TimeoutError:
        logs = f"\n{logs_tail(root)}" if root is not None else ""
        raise AssertionError(f"timed out waiting for {what}{logs}") from None


async def answers(bus: Bus, subj: str) -> bool:
    try:
        await bus.request(subj, b"", timeout=2.0)
    except errors.UnavailableError:
        return False
    return True


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
            return s.recv(16) == b"cm\n"
    except OSError:
        return False


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    made, _ = init_deployment(
        tmp_path / "site",
        organization="T",
        algorithm=Algorithm.P256,
        dtypes=DTYPES,
        passphrase=b"pw",
        nats_port=free_port(),
        now=SystemClock().now(),
    )
    dep = Deployment.load(made.root)
    try:
        yield dep
    finally:
        kill_stand_ins(dep.root)  # whatever a failed test left behind


@pytest.fixture
def cm_port() -> int:
    return free_port()


Start = Callable[..., Awaitable[Supervisor]]


@pytest.fixture
async def start(deployment: Deployment, cm_port: int) -> AsyncIterator[Start]:
    made: list[Supervisor] = []

    async def factory(mode: Mode | None, **kwargs: Any) -> Supervisor:
        settings = kwargs.pop("settings", FAST)
        commands = kwargs.pop("commands", stand_in_commands(cm_port))
        sup = Supervisor(deployment, commands=commands, settings=settings)
        made.append(sup)
        await sup.start(mode, by="test", **kwargs)
        return sup

    try:
        yield factory
    finally:
        for sup in made:
            await sup.stop()


@pytest.fixture
async def admin(deployment: Deployment) -> AsyncIterator[Callable[[], Awaitable[Bus]]]:
    made: list[Bus] = []

    async def factory() -> Bus:
        bus, _ = await connect_identity(deployment, "admin")
        made.append(bus)
        return bus

    try:
        yield factory
    finally:
        for bus in made:
            await bus.close()


async def cli(*args: str) -> tuple[int, str]:
    """Run ``iotdlm.cli.modes`` as its own process (what an operator types), return (exit code, output)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "iotdlm.cli.modes",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


# --- Table 1, process by process ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "with_sm"),
    [
        (Mode.PROVISIONING_SOFTWARE, False),
        (Mode.PROVISIONING_SOFTWARE, True),
        (Mode.PROVISIONING_CERTIFICATE, False),
        (Mode.SOFTWARE_MANAGEMENT, False),
        (Mode.CERTIFICATE_MANAGEMENT, False),
    ],
    ids=["prov-sw", "prov-sw+sm", "prov-cert", "sw-mgmt", "cert-mgmt"],
)
async def test_each_mode_runs_exactly_its_table_1_services(
    start: Start, admin: Callable[[], Awaitable[Bus]], deployment: Deployment, cm_port: int, mode: Mode, with_sm: bool
) -> None:
    sup = await start(mode, with_sm=with_sm)
    expected = expected_names(mode, with_sm=with_sm)
    root = deployment.root

    # processes: exactly one per service that is on, with the pid the supervisor reports
    await until(lambda: set(stand_ins(root)) == expected, f"the processes of {mode}")
    procs = stand_ins(root)
    assert all(len(pids) == 1 for pids in procs.values()), procs
    assert {name: svc.pid for name, svc in sup.services().items()} == {n: p[0] for n, p in procs.items()}

    # the bus: services that are on answer, the others have no process to answer
    bus = await admin()
    for name in sorted(expected):
        await until(lambda n=name: answers(bus, subject(n, "ping")), f"{name} to answer")  # type: ignore[misc]
    for name in sorted(ALL_NAMES - expected):
        assert not await answers(bus, subject(name, "ping")), name

    # the door to the outside: open only when cm runs (Table 1; section 5.2.1)
    if "cm" in expected:
        await until(lambda: port_open(cm_port), "cm's port to open")
    else:
        assert not port_open(cm_port)

    # the mode, where services read it and where `up` resumes it
    kv = await bus.key_value(subjects.MODE_BUCKET)
    entry = await kv.get(subjects.MODE_KEY)
    assert entry is not None
    record = ModeVerifier.for_deployment(deployment).verify(entry.value)
    assert (record.mode, record.by) == (mode.value, "test")
    saved = load_saved_mode(root)
    assert saved is not None
    assert (saved.mode, saved.with_sm) == (mode.value, with_sm)

    # defence in depth: km's own guard allows pm's certificate requests only in provisioning-certificate
    if "km" in expected:
        if mode is Mode.PROVISIONING_CERTIFICATE:
            assert await bus.request(subject("km", "guarded"), b"") == mode.value.encode()
        else:
            with pytest.raises(errors.ModeError, match=mode.value):
                await bus.request(subject("km", "guarded"), b"")
    for name in expected - {"km"}:
        assert await bus.request(subject(name, "guarded"), b"") == mode.value.encode()

    # status over NATS, as `iotdlm status` asks it
    st = decode(await bus.request(subjects.MODES_STATUS, b""), StatusReply)
    assert st.mode == mode.value
    rows = {s.name: s for s in st.services}
    assert set(rows) == ALL_NAMES
    assert {n for n, s in rows.items() if s.running} == expected
    assert all(rows[n].state == "off" and rows[n].pid is None for n in ALL_NAMES - expected)
    assert all(rows[n].pid == procs[n][0] and rows[n].restarts == 0 for n in expected)

    # stopping stops everything, and clears the mode
    await sup.stop()
    assert stand_ins(root) == {}
    assert not port_open(cm_port)
    assert load_saved_mode(root) == saved  # kept for the next `up`


async def test_up_creates_the_audit_heads_stream_append_only(start: Start, admin: Callable[[], Awaitable[Bus]]) -> None:
    """`iotdlm up` makes the audit log's third anchor (ADR 0005): a stream that denies delete and
    purge and keeps everything, which admin (`audit verify`) may read."""
    await start(Mode.PROVISIONING_CERTIFICATE)
    bus = await admin()
    info = json.loads(await bus.request(f"$JS.API.STREAM.INFO.{subjects.AUDIT_HEADS_STREAM}", b""))
    cfg = info["config"]
    assert cfg["subjects"] == [subjects.AUDIT_TREE_HEAD]
    assert (cfg["deny_delete"], cfg["deny_purge"], cfg["max_age"], cfg["storage"]) == (True, True, 0, "file")
    assert await (await bus.append_only_stream(subjects.AUDIT_HEADS_STREAM, subjects.AUDIT_TREE_HEAD)).read() == []


# --- switching ----------------------------------------------------------------------------------


async def test_mode_set_drains_stops_starts_and_audits(
    start: Start, admin: Callable[[], Awaitable[Bus]], deployment: Deployment, cm_port: int
) -> None:
    root = deployment.root
    sup = await start(Mode.PROVISIONING_CERTIFICATE)
    bus = await admin()
    for name in ("km", "pm-board-a", "pm-board-b"):
        await until(lambda n=name: answers(bus, subject(n, "ping")), f"{name} to answer")  # type: ignore[misc]
    km_pid = sup.services()["km"].pid
    pm_pid = sup.services()["pm-board-a"].pid
    assert not port_open(cm_port)

    # pm-board-a is in the middle of something when the switch comes
    work = asyncio.ensure_future(bus.request(subject("pm-board-a", "work"), b"1.0", timeout=WAIT))
    await until(lambda: (root / "work-pm-board-a.started").exists(), "pm-board-a to start working")

    code, out = await cli("mode", "set", "certificate-management", "--data", str(root))
    assert code == 0, out
    assert "provisioning-certificate" in out
    assert "certificate-management" in out
    assert "pm-board-a, pm-board-b" in out.replace("pm-board-b, pm-board-a", "pm-board-a, pm-board-b")

    # drained: the in-flight request was answered before pm stopped (not killed: status 0)
    assert await work == b"done:pm-board-a"
    log_text = (root / "logs" / "pm-board-a.log").read_text()
    assert "stopped (status 0)" in log_text
    assert pm_pid not in {p for pids in stand_ins(root).values() for p in pids}

    # stopped what turns off, kept what stays, started what turns on
    await until(lambda: set(stand_ins(root)) == {"km", "cm"}, "km and cm only")
    assert sup.services()["km"].pid == km_pid
    await until(lambda: port_open(cm_port), "cm's port to open")

    # the mode, everywhere
    assert sup.mode is Mode.CERTIFICATE_MANAGEMENT
    entry = await (await bus.key_value(subjects.MODE_BUCKET)).get(subjects.MODE_KEY)
    assert entry is not None
    record = ModeVerifier.for_deployment(deployment).verify(entry.value)
    assert record.mode == "certificate-management"
    assert "@" in record.by  # the operator who typed `mode set`
    saved = load_saved_mode(root)
    assert saved is not None
    assert saved.mode == "certificate-management"

    # km, still running, sees the new mode through its watch and now refuses pm's kind of request
    async def km_refuses() -> bool:
        try:
            await bus.request(subject("km", "guarded"), b"")
        except errors.ModeError:
            return True
        return False

    await until(km_refuses, "km's guard to see certificate-management")

    # audited, in order, in the deployment's store
    store = open_store(deployment)
    try:
        recs = store.list_audit(kind="mode_switch")
    finally:
        store.close()
    assert [(r.actor, r.data["from"], r.data["to"]) for r in recs] == [
        ("admin", "provisioning-certificate", "certificate-management"),
        ("modes", "off", "provisioning-certificate"),
    ]
    assert recs[0].data["stopped"] == ["pm-board-b", "pm-board-a"]  # reverse start order
    assert recs[0].data["started"] == ["cm"]
    assert recs[0].data["by"] == record.by

    # and back: the door closes before pm comes back
    raw = await bus.request(
        subjects.MODES_SET, json.dumps({"mode": "provisioning-certificate", "by": "t"}).encode(), timeout=WAIT
    )
    reply = decode(raw, SetReply)
    assert (reply.from_mode, reply.to, reply.stopped, reply.started, reply.kept) == (
        "certificate-management",
        "provisioning-certificate",
        ["cm"],
        ["pm-board-a", "pm-board-b"],
        ["km"],
    )
    assert not port_open(cm_port)
    await until(lambda: set(stand_ins(root)) == {"km", "pm-board-a", "pm-board-b"}, "pm back")

    # the same mode again: nothing changes, nothing is audited
    code, out = await cli("mode", "set", "provisioning-certificate", "--data", str(root))
    assert code == 0, out
    assert "nothing changed" in out
    store = open_store(deployment)
    try:
        assert len(store.list_audit(kind="mode_switch")) == 3
    finally:
        store.close()


async def test_attack_forged_mode_record_is_refused_audited_and_repaired_by_mode_set(
    start: Start, admin: Callable[[], Awaitable[Bus]], deployment: Deployment, cm_port: int
) -> None:
    """Issue 11 attack 2 (forged operation mode): a mode record in the bucket that is not signed
    by the supervisor -- here an unsigned record naming provisioning-certificate while the
    deployment is in certificate-management with cm running, written with the only login that
    may write the bucket (the forged stream of the issue wrote the same bytes) -- sets no mode.
    km and cm refuse work ("cannot be trusted") instead of acting as if in provisioning; each
    publishes an alarm, which the supervisor writes to the audit log (kind ``alarm``, check
    ``mode_record_refused``); ``status`` says the record does not verify; and ``mode set`` to the
    mode in force re-asserts it (audited, check ``mode_record_repaired``) instead of saying
    "nothing changed"."""
    root = deployment.root
    await start(Mode.CERTIFICATE_MANAGEMENT)
    bus = await admin()
    for name in ("km", "cm"):
        await until(lambda n=name: answers(bus, subject(n, "ping")), f"{name} to answer")  # type: ignore[misc]
    assert await bus.request(subject("cm", "guarded"), b"") == b"certificate-management"

    forger, _ = await connect_identity(deployment, subjects.SUPERVISOR)
    try:
        kv = await forger.key_value(subjects.MODE_BUCKET)
        forged = ModeRecord(mode="provisioning-certificate", since="2026-01-01T00:00:00+00:00", by="attacker")
        await kv.put(subjects.MODE_KEY, encode(forged))
    finally:
        await forger.close()

    async def refuses(name: str) -> bool:
        try:
            await bus.request(subject(name, "guarded"), b"")
        except errors.ModeError as exc:
            return "cannot be trusted" in exc.message
        return False

    for name in ("km", "cm"):
        await until(lambda n=name: refuses(n), f"{name} to refuse the forged mode")  # type: ignore[misc]

    def alarms() -> list[str]:
        store = open_store(deployment)
        try:
            return sorted(
                r.actor for r in store.list_audit(kind="alarm") if r.data.get("check") == "mode_record_refused"
            )
        finally:
            store.close()

    await until(lambda: alarms() == ["cm", "km"], "the alarms of km and cm in the audit log")

    st = decode(await bus.request(subjects.MODES_STATUS, b""), StatusReply)
    assert st.mode == "certificate-management"
    assert "plain JSON" in st.record
    code, out = await cli("status", "--data", str(root))
    assert code == 0, out
    assert "NOT VERIFIED" in out

    code, out = await cli("mode", "set", "certificate-management", "--data", str(root))
    assert code == 0, out
    assert "nothing changed" not in out
    assert "repaired" in out

    async def accepts(name: str) -> bool:
        try:
            return await bus.request(subject(name, "guarded"), b"") == b"certificate-management"
        except errors.ModeError:
            return False

    await until(lambda: accepts("cm"), "cm to accept the re-asserted mode")
    st = decode(await bus.request(subjects.MODES_STATUS, b""), StatusReply)
    assert st.record == "verified"
    code, out = await cli("status", "--data", str(root))
    assert "verified" in out
    assert "NOT VERIFIED" not in out
    store = open_store(deployment)
    try:
        repaired = [r for r in store.list_audit(kind="alarm") if r.data.get("check") == "mode_record_repaired"]
    finally:
        store.close()
    assert len(repaired) == 1
    assert "plain JSON" in str(repaired[0].data["problem"])


async def test_attack_up_with_the_nats_port_taken_sends_no_credentials(start: Start, deployment: Deployment) -> None:
    """Issue 11 (section 4): with the deployment's NATS port already taken by another server
    that greets like nats-server, `iotdlm up` does not take it for its own (the greeting must carry
    the random server name of this start): it fails, saying so, and the other server received
    nothing -- in particular not the modes user's credentials."""
    impostor = ImpostorNats(deployment.config.nats.port)
    try:
        with pytest.raises(errors.UnavailableError, match="another server answers") as info:
            await start(Mode.PROVISIONING_CERTIFICATE)
        assert "no credentials were sent" in info.value.message
    finally:
        impostor.close()
    assert impostor.received == b""
    assert stand_ins(deployment.root) == {}


async def test_only_admin_may_switch(start: Start, deployment: Deployment) -> None:
    await start(Mode.PROVISIONING_SOFTWARE)
    for name in ("km", "pm-board-a", "sm", "cm"):
        bus, _ = await connect_identity(deployment, name)
        try:
            with pytest.raises(errors.PermissionDeniedError):
                await bus.request(subjects.MODES_SET, b'{"mode": "software-management"}')
        finally:
            await bus.close()


async def test_bad_switch_requests_are_refused(
    start: Start, admin: Callable[[], Awaitable[Bus]], deployment: Deployment
) -> None:
    sup = await start(Mode.PROVISIONING_SOFTWARE)
    bus = await admin()
    with pytest.raises(errors.BadRequestError, match="unknown mode"):
        await bus.request(subjects.MODES_SET, b'{"mode": "maintenance"}')
    with pytest.raises(errors.BadRequestError):
        await bus.request(subjects.MODES_SET, b"\xff garbage")
    assert sup.mode is Mode.PROVISIONING_SOFTWARE


# --- crashes ------------------------------------------------------------------------------------


async def test_a_killed_service_is_restarted(
    start: Start, admin: Callable[[], Awaitable[Bus]], deployment: Deployment, cm_port: int
) -> None:
    sup = await start(Mode.CERTIFICATE_MANAGEMENT)
    bus = await admin()
    await until(lambda: answers(bus, subject("km", "ping")), "km to answer")
    old = sup.services()["km"].pid
    assert old is not None
    os.kill(old, signal.SIGKILL)

    def restarted() -> bool:
        h = sup.services()["km"].health()
        return h.running and h.pid != old and h.restarts == 1

    await until(restarted, "km to be restarted")
    health = sup.services()["km"].health()
    assert health.last_exit == -signal.SIGKILL
    assert stand_ins(deployment.root)["km"] == [health.pid]
    await until(lambda: answers(bus, subject("km", "ping")), "the new km to answer")
    assert "exited with status -9" in (deployment.root / "logs" / "km.log").read_text()
    assert sup.services()["cm"].restarts == 0


async def test_a_service_that_keeps_crashing_is_given_up_and_re_armed_by_mode_set(
    start: Start, admin: Callable[[], Awaitable[Bus]], deployment: Deployment, cm_port: int
) -> None:
    commands = stand_in_commands(cm_port)
    commands["sm"] = ["{python}", "-c", "import sys; print('sm cannot start: no repository'); sys.exit(3)"]
    sup = await start(Mode.SOFTWARE_MANAGEMENT, commands=commands)

    await until(lambda: sup.services()["sm"].state == "failed", "the supervisor to give up on sm")
    h = sup.services()["sm"].health()
    assert (h.running, h.pid, h.last_exit, h.restarts) == (False, None, 3, FAST.give_up_after - 1)
    log_text = (deployment.root / "logs" / "sm.log").read_text()
    assert log_text.splitlines().count("sm cannot start: no repository") == FAST.give_up_after
    assert "gave up after 3 quick crashes in a row" in log_text
    assert sup.services()["cm"].state == "running"  # the others are not affected

    bus = await admin()
    st = decode(await bus.request(subjects.MODES_STATUS, b""), StatusReply)
    assert {s.name: s.state for s in st.services}["sm"] == "failed"

    reply = decode(await bus.request(subjects.MODES_SET, b'{"mode": "software-management"}', timeout=WAIT), SetReply)
    assert reply.restarted == ["sm"]
    assert reply.stopped == []
    assert reply.started == []
    assert sup.services()["sm"].state in {"starting", "running", "backoff", "failed"}


def _console_failed(sup: Supervisor) -> Callable[[], bool]:
    def failed() -> bool:
        console = sup.status().console
        return console is not None and console.state == "failed"

    return failed


@pytest.mark.real_clock  # no clock matters here; heavy (three console starts, ~15 s): run once in CI
async def test_a_console_whose_port_is_taken_is_given_up_after_a_few_tries(
    deployment: Deployment, admin: Callable[[], Awaitable[Bus]], cm_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 18: two deployments on one machine both wanted 8444; the loser's console restarted
    forever. The real console (`iotdlm console serve`) takes its port first and says which setting
    to change; the supervisor gives it up after CONSOLE_TRIES, the rest keeps running, and
    `status` shows the console's address and state."""
    from iotdlm.modes.table import CONSOLE, DEFAULT_COMMANDS
    from iotdlm.supervisor.supervisor import CONSOLE_TRIES

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with (deployment.root / "iotdlm.toml").open("a") as f:
            f.write(f"\n[console]\nport = {port}\n")
        commands = {**stand_in_commands(cm_port), CONSOLE: list(DEFAULT_COMMANDS[CONSOLE])}
        sup = Supervisor(Deployment.load(deployment.root), commands=commands, settings=FAST)
        try:
            await sup.start(Mode.CERTIFICATE_MANAGEMENT, by="test")
            st = sup.status()
            assert st.console is not None
            assert st.console_url == f"https://127.0.0.1:{port}/"
            await until(_console_failed(sup), "the supervisor to give up on the console")
            bus = await admin()
            st = decode(await bus.request(subjects.MODES_STATUS, b""), StatusReply)
            assert st.console is not None
            assert (st.console.state, st.console.restarts) == ("failed", CONSOLE_TRIES - 1)
            assert st.console.last_error is not None
            assert f"cannot listen on 127.0.0.1:{port}" in st.console.last_error
            gave_up = [r.getMessage() for r in caplog.records if "gave up after" in r.getMessage()]
            assert len(gave_up) == 1
            assert f"the console stays off: if its port is taken, set [console] port in {deployment.root}" in gave_up[0]
            assert f"cannot listen on 127.0.0.1:{port}" in gave_up[0]
            assert {s.name: s.state for s in st.services}["km"] == "running"  # the rest is not affected
        finally:
            await sup.stop()


# --- the commands, as processes -------------------------------------------------------------------


async def test_up_runs_in_the_foreground_resumes_the_last_mode_and_stops_cleanly(
    deployment: Deployment, cm_port: int, tmp_path: Path
) -> None:
    root = deployment.root
    commands = tmp_path / "commands.json"
    commands.write_text(json.dumps(stand_in_commands(cm_port)))

    code, out = await cli("status", "--data", str(root))
    assert code == 3
    assert f"no supervisor runs for {root}" in out
    assert f"iotdlm up --data {root} --mode MODE" in " ".join(out.split())

    async def up(*extra: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "iotdlm.cli.modes",
            "up",
            "--data",
            str(root),
            "--commands",
            str(commands),
            *extra,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # its own process group, as a shell runs a job in a terminal
        )

    async def status_json() -> StatusReply | None:
        """What `iotdlm status --json` prints, asked in-process (each CLI run costs an interpreter)."""
        try:
            bus, _ = await connect_identity(deployment, "admin")
        except errors.UnavailableError:
            return None
        try:
            return decode(await bus.request(subjects.MODES_STATUS, b""), StatusReply)
        except errors.UnavailableError:
            return None
        finally:
            await bus.close()

    async def running(names: set[str]) -> bool:
        st = await status_json()
        return st is not None and {s.name for s in st.services if s.running} == names

    proc = await up("--mode", "provisioning-software", "--with-sm")
    try:
        await until(lambda: running({"sm", "pm-board-a", "pm-board-b"}), "up to run provisioning-software")
        code, out = await cli("status", "--data", str(root))
        assert code == 0, out
        assert "provisioning-software" in out
        assert "(with sm)" in out
        for name in ("km", "sm", "cm", "pm-board-a", "pm-board-b"):
            assert name in out
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
        assert stand_ins(root) == {}
        assert (root / "logs" / "modes.log").is_file()

        # no --mode: the last one comes back (with sm, as before)
        proc = await up()
        await until(lambda: running({"sm", "pm-board-a", "pm-board-b"}), "up to resume provisioning-software")
        st = await status_json()
        assert st is not None
        assert (st.mode, st.with_sm) == ("provisioning-software", True)

        # a second supervisor for the same deployment is refused
        code, out = await cli("up", "--data", str(root), "--commands", str(commands))
        assert code == 4, out
        assert "another supervisor" in out

        # Ctrl-C in the terminal: SIGINT to the whole foreground process group, while a service
        # is busy -- it drains through NATS, which stops only after it
        bus, _ = await connect_identity(deployment, "admin")
        try:
            await until(lambda: answers(bus, subject("pm-board-b", "ping")), "pm-board-b to answer", root=root)
            work = asyncio.ensure_future(bus.request(subject("pm-board-b", "work"), b"1.0", timeout=WAIT))
            await until(lambda: (root / "work-pm-board-b.started").exists(), "pm-board-b to start working", root=root)
            os.killpg(proc.pid, signal.SIGINT)
            assert await work == b"done:pm-board-b"
        finally:
            await bus.close()
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
        assert stand_ins(root) == {}
        assert nats_servers(root) == []
        assert "stopped (status 0)" in (root / "logs" / "pm-board-b.log").read_text().rsplit("starting", 1)[1]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    store = open_store(deployment)
    try:
        switches = [(r.data["from"], r.data["to"], r.data["reason"]) for r in store.list_audit(kind="mode_switch")]
    finally:
        store.close()
    assert switches == [
        ("provisioning-software", "off", "shutdown"),
        ("off", "provisioning-software", "up"),
        ("provisioning-software", "off", "shutdown"),
        ("off", "provisioning-software", "up"),
    ]


async def test_up_without_a_mode_the_first_time_says_what_to_do(deployment: Deployment) -> None:
    code, out = await cli("up", "--data", str(deployment.root))
    assert code == 4
    assert "--mode" in out
    assert stand_ins(deployment.root) == {}


async def test_a_supervisor_killed_hard_leaves_no_orphans(deployment: Deployment, cm_port: int, tmp_path: Path) -> None:
    root = deployment.root
    commands = tmp_path / "commands.json"
    commands.write_text(json.dumps(stand_in_commands(cm_port)))

    async def up() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "iotdlm.cli.modes",
            "up",
            "--data",
            str(root),
            "--mode",
            "certificate-management",
            "--commands",
            str(commands),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    proc = await up()
    try:
        await until(lambda: set(stand_ins(root)) == {"km", "cm"}, "km and cm to run")
        assert len(nats_servers(root)) == 1
    finally:
        proc.kill()
        await proc.wait()
    try:
        # the services and NATS get SIGTERM from the kernel when their supervisor dies
        await until(lambda: stand_ins(root) == {}, "the services of a dead supervisor to stop")
        await until(lambda: nats_servers(root) == [], "the NATS server of a dead supervisor to stop")
        # and the next `up` starts afresh, in the same mode
        proc = await up()
        await until(lambda: set(stand_ins(root)) == {"km", "cm"}, "km and cm to run again")
        assert len(nats_servers(root)) == 1
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
        assert stand_ins(root) == {}
        assert nats_servers(root) == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid in nats_servers(root):
            os.kill(pid, signal.SIGKILL)


async def test_signer_alarms_are_audited_and_a_flood_is_held_back(start: Start, deployment: Deployment) -> None:
    """A module that refused a revoked signer (km, the supervisor) publishes a signer alarm: the
    supervisor writes it to the audit log (check ``revoked_signer``). A module (or a stolen login)
    repeating the same alarm does not flood the audit log: the same reason is audited once per
    minute, and the next audited one counts those held back (see the mode guard's flood test)."""
    await start(Mode.SOFTWARE_MANAGEMENT)
    cm, _ = await connect_identity(deployment, "cm")
    try:
        flood = json.dumps({"signer": "km", "reason": "km's certificate is revoked"}).encode()
        for _ in range(20):
            await cm.publish(subjects.events("cm", subjects.SIGNER_ALARM), flood)
        sentinel = json.dumps({"signer": "modes", "reason": "the supervisor's certificate is revoked"}).encode()
        await cm.publish(subjects.events("cm", subjects.SIGNER_ALARM), sentinel)
    finally:
        await cm.close()

    def audited() -> list[str]:
        store = open_store(deployment)
        try:
            return [
                str(r.data.get("reason"))
                for r in store.list_audit(kind="alarm")
                if r.data.get("check") == "revoked_signer" and r.actor == "cm"
            ]
        finally:
            store.close()

    # events of one subscription are handled in order: once the sentinel is in, the flood was seen
    await until(lambda: "the supervisor's certificate is revoked" in audited(), "the sentinel alarm audited")
    assert audited().count("km's certificate is revoked") == 1


# --- restarting services in the mode in force (`iotdlm restart`) ------------------------------------


async def test_restart_stops_and_starts_only_the_named_services_and_audits_it(
    start: Start, admin: Callable[[], Awaitable[Bus]], deployment: Deployment, cm_port: int
) -> None:
    root = deployment.root
    sup = await start(Mode.CERTIFICATE_MANAGEMENT)
    bus = await admin()
    await until(lambda: answers(bus, subject("km", "ping")), "km to answer")
    await until(lambda: port_open(cm_port), "cm's port to open")
    km_pid, cm_pid = sup.services()["km"].pid, sup.services()["cm"].pid
    mode_before = load_saved_mode(root)
    assert mode_before is not None

    code, out = await cli("restart", "cm", "--data", str(root))
    assert code == 0, out
    assert "restarted cm (mode certificate-management, unchanged)" in " ".join(out.split())
    await until(lambda: stand_ins(root).get("cm", [cm_pid]) != [cm_pid], "a new cm process")
    assert sup.services()["km"].pid == km_pid  # not named: not touched
    assert sup.services()["cm"].pid != cm_pid
    assert sup.mode is Mode.CERTIFICATE_MANAGEMENT
    assert "stopped (status 0)" in (root / "logs" / "cm.log").read_text()  # drained, not killed
    await until(lambda: port_open(cm_port), "cm's port to open again")

    # over the bus, as the console or a script asks: the reply says what restarted
    raw = await bus.request(
        subjects.MODES_RESTART, json.dumps({"services": ["km", "cm"], "by": "t"}).encode(), timeout=WAIT
    )
    reply = decode(raw, SetReply)
    assert (reply.from_mode, reply.to, reply.stopped, reply.started, sorted(reply.restarted)) == (
        "certificate-management", "certificate-management", [], [], ["cm", "km"],
    )  # fmt: skip
    assert sup.services()["km"].pid != km_pid
    assert reply.since == mode_before.since
    assert load_saved_mode(root) == mode_before  # the mode's record is as it was: since, by

    # what does not run in this mode is refused, naming what runs; nothing restarts
    km_now = sup.services()["km"].pid
    for body, why in (
        ({"services": ["pm"]}, "not running in certificate-management: pm (running: km, cm)"),
        ({"services": []}, "name the services to restart"),
        ({"services": ["km"], "extra": 1}, "unknown field"),
    ):
        with pytest.raises(errors.BadRequestError, match=re.escape(why)):
            await bus.request(subjects.MODES_RESTART, json.dumps(body).encode(), timeout=WAIT)
    assert sup.services()["km"].pid == km_now

    store = open_store(deployment)
    try:
        recs = [r for r in store.list_audit(kind="mode_switch") if r.data["reason"] == "restart"]
    finally:
        store.close()
    assert [(r.actor, r.data["to"], r.data["started"], r.data["stopped"]) for r in recs] == [
        ("admin", "certificate-management", ["km", "cm"], []),  # started in start order
        ("admin", "certificate-management", ["cm"], []),
    ]
    assert "@" in recs[1].data["by"]  # the operator who typed `iotdlm restart`
    assert recs[0].data["by"] == "t"


async def test_only_admin_may_restart(start: Start, deployment: Deployment) -> None:
    sup = await start(Mode.CERTIFICATE_MANAGEMENT)
    await until(lambda: "km" in stand_ins(deployment.root), "km")
    km_pid = sup.services()["km"].pid
    for name in ("km", "pm-board-a", "sm", "cm"):  # a stolen module login cannot bounce km
        bus, _ = await connect_identity(deployment, name)
        try:
            with pytest.raises(errors.PermissionDeniedError):
                await bus.request(subjects.MODES_RESTART, b'{"services": ["km"]}')
        finally:
            await bus.close()
    assert sup.services()["km"].pid == km_pid
