"""The operator's day with `iotdlm init / up / status / down` and the commands around them, run as
an operator runs them: the real `iotdlm` entry point in its own process (issue 14, stumbles 2, 3,
5, 7 and 10). Services are the stand-ins of test_modes (a real NATS server, real processes), except
where a test needs one that fails."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import tomli_w

from iotdlm.bus.server import free_port
from iotdlm.clock import SystemClock
from iotdlm.deployment import CONFIG_FILE, PASSPHRASE_ENV, Deployment, init_deployment
from iotdlm.pki.keys import Algorithm
from iotdlm.supervisor.preflight import lock_holder
from iotdlm.wire.modes import StatusReply, decode
from tests.integration.test_modes import WAIT, kill_stand_ins, nats_servers, stand_in_commands, stand_ins, until

pytestmark = pytest.mark.nats

DTYPE = "board-a"
#: a km that fails the way a km with the wrong CA passphrase does, every time it starts
FAILING_KM = (
    "import sys; print('km: loading the CA keys', flush=True); "
    "print('refused (bad_request): cannot load private key: wrong passphrase or not a PEM private key', "
    "file=sys.stderr); sys.exit(4)"
)


def iotdlm(*args: str, env: dict[str, str] | None = None, timeout: float = WAIT) -> subprocess.CompletedProcess[str]:
    """``iotdlm ARGS`` as its own process, as an operator types it (wide, so lines are not wrapped)."""
    return subprocess.run(
        [sys.executable, "-m", "iotdlm.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "COLUMNS": "250", **(env or {})},
    )


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A deployment whose CA passphrase `init` generated into DIR/secrets/ca-passphrase."""
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    dep, _ = init_deployment(
        tmp_path / "site",
        organization="T",
        algorithm=Algorithm.P256,
        dtypes=[DTYPE],
        nats_port=free_port(),
        now=SystemClock().now(),
    )
    try:
        yield dep.root
    finally:
        kill_stand_ins(dep.root)
        for pid in nats_servers(dep.root):
            os.kill(pid, signal.SIGKILL)


def nothing_started(root: Path) -> bool:
    return nats_servers(root) == [] and stand_ins(root) == {} and not (root / "logs" / "km.log").exists()


# --- stumble 2: init says what the README says next -----------------------------------------------


def test_init_ends_with_the_readmes_next_step(tmp_path: Path) -> None:
    data = tmp_path / "site"
    out = iotdlm("init", "--data", str(data), "--dtype", DTYPE, "--nats-port", str(free_port()))
    assert out.returncode == 0, out.stderr
    text = one_line(out.stdout)
    assert f"Next: `iotdlm up --data {data} --mode provisioning-certificate`" in text
    assert "nats serve" not in text
    assert "km serve" not in text
    assert f"supply it through ${PASSPHRASE_ENV} when you run `iotdlm up`" in text


# --- stumble 7: pm setup refuses a bench that does not exist ----------------------------------------


def test_pm_setup_refuses_a_bench_folder_that_does_not_exist(site: Path) -> None:
    missing = site.parent / "no-such-bench"
    out = iotdlm("pm", "setup", "--data", str(site), "--dtype", DTYPE, "--bench", str(missing))
    assert out.returncode == 4, out.stdout + out.stderr
    text = one_line(out.stderr)
    assert f"bench folder {missing} does not exist" in text
    assert f"iotdlm pm bench make --dir {missing} --dtype {DTYPE}" in text
    assert "Traceback" not in out.stderr
    assert not (site / "pm" / DTYPE / "config.toml").exists()  # nothing written
    missing.mkdir()
    out = iotdlm("pm", "setup", "--data", str(site), "--dtype", DTYPE, "--bench", str(missing))
    assert out.returncode == 0, out.stdout + out.stderr


# --- stumble 3: up checks before it starts anything ----------------------------------------------


def test_up_with_the_wrong_passphrase_starts_nothing_and_says_why(site: Path) -> None:
    out = iotdlm("up", "--data", str(site), "--mode", "provisioning-certificate", env={PASSPHRASE_ENV: "not-the-one"})
    assert out.returncode == 4, out.stdout + out.stderr
    text = one_line(out.stderr)
    assert "nothing was started" in text
    assert f"- ${PASSPHRASE_ENV} does not open the CA keys in {site / 'ca'}" in text
    assert "Traceback" not in out.stderr
    assert nothing_started(site)


def test_up_with_a_port_in_use_names_the_port_and_its_holder(site: Path) -> None:
    port = Deployment.load(site).config.nats.port
    bench = site.parent / "bench"
    bench.mkdir()
    (site / "pm" / DTYPE).mkdir(parents=True)
    (site / "pm" / DTYPE / "config.toml").write_text(f'bench = "{site.parent / "gone"}"\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        out = iotdlm("up", "--data", str(site), "--mode", "provisioning-software")
    assert out.returncode == 4, out.stdout + out.stderr  # the bench is a configuration problem: 4
    text = one_line(out.stderr)
    assert f"- port {port} (NATS) is in use by " in text
    assert f"(pid {os.getpid()})" in text
    assert f"pm-{DTYPE}'s bench folder {site.parent / 'gone'} does not exist" in text
    assert nothing_started(site)
    (site / "pm" / DTYPE / "config.toml").write_text(f'bench = "{bench}"\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        out = iotdlm("up", "--data", str(site), "--mode", "provisioning-software")
    assert out.returncode == 3, out.stdout + out.stderr  # only a port in the way: 3
    assert "Is the NATS server" not in out.stderr


# --- stumble 5: a port in use is named as such ----------------------------------------------------


def test_repo_serve_on_a_port_in_use_says_so(tmp_path: Path) -> None:
    vendor = tmp_path / "vendor"
    assert iotdlm("repo", "init", "--dir", str(vendor), "--no-reports").returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = iotdlm("repo", "serve", "--dir", str(vendor), "--port", str(port))
    assert out.returncode == 3, out.stdout + out.stderr
    text = one_line(out.stderr)
    assert f"port {port} (repository) is in use by " in text
    assert "give another with --port" in text
    assert "Is the NATS server" not in text
    assert "Traceback" not in text


# --- stumble 10: status and down with nothing running ----------------------------------------------


def test_status_and_down_with_no_supervisor(site: Path) -> None:
    out = iotdlm("status", "--data", str(site))
    assert out.returncode == 3
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr  # no `iotdlm.bus.nats WARNING` lines before it
    assert f"no supervisor runs for {site}: start one with `iotdlm up --data {site} --mode MODE`" in lines[0]
    out = iotdlm("mode", "set", "--data", str(site), "certificate-management")
    assert out.returncode == 3
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    out = iotdlm("down", "--data", str(site))
    assert out.returncode == 0, out.stderr
    assert f"nothing is running for {site}" in one_line(out.stdout)


# --- stumbles 3 and 10: status shows why a service is not running; down stops everything ---------------


async def test_status_shows_the_last_error_and_down_stops_everything(site: Path, tmp_path: Path) -> None:
    commands = tmp_path / "commands.json"
    table = stand_in_commands(free_port())
    table["km"] = ["{python}", "-c", FAILING_KM]
    commands.write_text(json.dumps(table))
    up = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "iotdlm.cli.main",
        "up",
        "--data",
        str(site),
        "--mode",
        "certificate-management",
        "--commands",
        str(commands),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # the supervisor keeps restarting km, which is "running" for the moment each try lasts: each
        # status below is asked again until it finds km between two tries
        seen: list[StatusReply] = []

        def km_failed() -> bool:
            out = iotdlm("status", "--data", str(site), "--json")
            if out.returncode != 0:
                return False
            st = decode(out.stdout.encode(), StatusReply)
            km = next(s for s in st.services if s.name == "km")
            if km.last_error and not km.running and "cm" in stand_ins(site):
                seen.append(st)
            return bool(seen)

        await until(km_failed, "km to fail and cm to run", root=site)
        st = seen[0]
        km = next(s for s in st.services if s.name == "km")
        assert km.last_exit == 4
        assert km.last_error == (
            "refused (bad_request): cannot load private key: wrong passphrase or not a PEM private key"
        )
        assert next(s for s in st.services if s.name == "cm").last_error is None  # running: none shown

        lines: list[str] = []

        def km_line_shown() -> bool:
            out = iotdlm("status", "--data", str(site))
            assert out.returncode == 0, out.stderr
            lines.extend(x for x in out.stdout.splitlines() if x.startswith("km ") and "last exit 4" in x)
            return bool(lines)

        await until(km_line_shown, "status to show km's last exit and error", root=site)
        line = lines[0]
        assert "refused (bad_request): cannot load private key: wrong passphrase" in line
        assert str(site / "logs" / "km.log") in line

        out = iotdlm("down", "--data", str(site), timeout=WAIT * 2)
        assert out.returncode == 0, out.stdout + out.stderr
        text = one_line(out.stdout)
        assert "stopped cm" in text
        assert "NATS" in text
        assert await asyncio.wait_for(up.wait(), WAIT) == 0
        assert lock_holder(site) is None
        assert stand_ins(site) == {}
        assert nats_servers(site) == []
    finally:
        if up.returncode is None:
            up.kill()
            await up.wait()


# --- a host of several (`up --services`): status and down answer for that host ---------------------


def _set_config(root: Path, **values: object) -> None:
    """Keys of ``DIR/iotdlm.toml``, dotted for a table (``nats.url``), as an operator edits them."""
    raw = msgspec.toml.decode((root / CONFIG_FILE).read_bytes())
    for key, value in values.items():
        table, _, name = key.rpartition(".")
        (raw.setdefault(table, {}) if table else raw)[name] = value
    (root / CONFIG_FILE).write_bytes(tomli_w.dumps(raw).encode())


async def _up(root: Path, commands: Path, *extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "iotdlm.cli.main", "up", "--data", str(root), "--mode", "certificate-management",
        "--commands", str(commands), *extra,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


def _status(root: Path) -> StatusReply | None:
    out = iotdlm("status", "--data", str(root), "--json")
    return decode(out.stdout.encode(), StatusReply) if out.returncode == 0 else None


async def test_a_services_host_answers_status_and_down_for_itself(site: Path, tmp_path: Path) -> None:
    """Host A runs the whole deployment (its own NATS); host B, a copy of the folder pointed at A's
    NATS, runs only km (`up --services km`). `status` on B shows B's part; `down` on B stops B and
    nothing else. Asked on the bus, as before, B's `down` reached the one supervisor that answers the
    bus's stop request -- A's -- and stopped the other host."""
    host_b = tmp_path / "host-b"
    _set_config(site, metrics_port=0, **{"console.enabled": False})  # no fixed port for two hosts on one machine
    shutil.copytree(site, host_b)
    _set_config(host_b, **{"nats.url": Deployment.load(site).nats_url})
    commands = tmp_path / "commands.json"
    commands.write_text(json.dumps(stand_in_commands(free_port())))
    a = await _up(site, commands)
    b: asyncio.subprocess.Process | None = None
    try:
        await until(lambda: _status(site) is not None and "cm" in stand_ins(site), "host A up", root=site)
        b = await _up(host_b, commands, "--services", "km")
        seen: list[StatusReply] = []

        def b_runs_km() -> bool:
            st = _status(host_b)
            if st is not None and [s.name for s in st.services] == ["km"] and st.services[0].running:
                seen.append(st)
            return bool(seen)

        await until(b_runs_km, "host B's status to show its km running", root=host_b)
        assert b is not None
        assert seen[0].supervisor_pid == b.pid
        a_status = _status(site)
        assert a_status is not None
        assert a_status.supervisor_pid == a.pid
        assert {"km", "cm"} <= {s.name for s in a_status.services}

        text = one_line(iotdlm("status", "--data", str(host_b)).stdout)
        assert "this host runs only km of the deployment (`iotdlm up --services`)" in text
        watch = iotdlm("status", "--data", str(host_b), "--watch")
        assert watch.returncode == 4
        assert "runs only km (`up --services`)" in one_line(watch.stderr)

        a_km = stand_ins(site)["km"]
        out = iotdlm("restart", "--data", str(host_b), "km")  # on the bus it would bounce host A's km
        assert out.returncode == 4, out.stdout + out.stderr
        assert "runs only km (`up --services`) and answers no restart request" in one_line(out.stderr)
        assert stand_ins(site)["km"] == a_km

        out = iotdlm("down", "--data", str(host_b), timeout=WAIT * 2)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "stopped km on this host" in one_line(out.stdout)
        assert await asyncio.wait_for(b.wait(), WAIT) == 0
        assert lock_holder(host_b) is None
        assert not (host_b / "modes.host.json").exists()
        assert "km" not in stand_ins(host_b)
        # host A was not asked to stop: its supervisor, its services and its NATS run on
        assert lock_holder(site) == a.pid
        assert a.returncode is None
        assert "cm" in stand_ins(site)
        assert nats_servers(site) != []
        after = _status(site)
        assert after is not None
        assert after.supervisor_pid == a.pid

        out = iotdlm("down", "--data", str(site), timeout=WAIT * 2)
        assert out.returncode == 0, out.stdout + out.stderr
        assert await asyncio.wait_for(a.wait(), WAIT) == 0
    finally:
        for proc in (a, b):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
        kill_stand_ins(host_b)
