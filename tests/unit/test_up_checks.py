"""What `iotdlm up` checks before it starts anything, and what `status` says of a service that is
not running (issue 14, stumbles 1, 3, 5, 7). The preflight runs on a real deployment folder, real
CA keys and real sockets; nothing here starts a service."""

from __future__ import annotations

import fcntl
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotdlm.bus.server import free_port
from iotdlm.clock import SystemClock
from iotdlm.deployment import DEFAULT_NATS_PORT, PASSPHRASE_ENV, Deployment, init_deployment
from iotdlm.modes.table import DEFAULT_COMMANDS, WITHOUT_CONSOLE, Mode
from iotdlm.pki.keys import Algorithm
from iotdlm.supervisor.preflight import (
    LOCK_FILE,
    Problem,
    lock_holder,
    port_holder,
    port_in_use,
    port_in_use_message,
    preflight,
)
from iotdlm.supervisor.processes import LAST_ERROR_MAX, last_error_line

DTYPE = "board-a"


# --- the last error of a service, from its log ------------------------------------------------------

NOTE = "--- 2026-01-01T00:00:00+00:00 iotdlm modes:"


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        pytest.param(
            f"{NOTE} starting km: python -m iotdlm.cli.main km serve\n"
            "refused (bad_request): cannot load private key: wrong passphrase or not a PEM private key\n",
            "refused (bad_request): cannot load private key: wrong passphrase or not a PEM private key",
            id="cli-refusal",
        ),
        pytest.param(
            f"{NOTE} starting km: x\nrefused (bad_request): old run\n{NOTE} exited with status 4\n"
            f"{NOTE} starting km: x\nerror (unavailable): this run\n{NOTE} exited with status 3\n",
            "error (unavailable): this run",
            id="only-the-last-run",
        ),
        pytest.param(
            f"{NOTE} starting pm-a: x\n"
            "2026-01-01 00:00:00,000 iotdlm.pm ERROR pm-a: the flasher failed\n"
            "2026-01-01 00:00:01,000 iotdlm.bus.nats WARNING pm: disconnected from NATS\n",
            "2026-01-01 00:00:00,000 iotdlm.pm ERROR pm-a: the flasher failed",
            id="error-record-beats-a-later-warning",
        ),
        pytest.param(
            f'{NOTE} starting sm: x\nTraceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
            "ModuleNotFoundError: No module named 'iotdlm'\n",
            "ModuleNotFoundError: No module named 'iotdlm'",
            id="traceback",
        ),
        pytest.param(f"{NOTE} starting sm: x\nsm serving\n", "sm serving", id="no-error-last-line"),
        pytest.param(f"{NOTE} starting sm: x\n{NOTE} exited with status 1\n", None, id="wrote-nothing"),
        pytest.param("", None, id="empty"),
        pytest.param("error (x): a\x1b[31m red\x00 line\n", "error (x): a[31m red line", id="control-chars"),
    ],
)
def test_last_error_line(log: str, expected: str | None) -> None:
    assert last_error_line(log) == expected


def test_last_error_line_is_cut() -> None:
    got = last_error_line("error (x): " + "y" * 1000)
    assert got is not None
    assert len(got) == LAST_ERROR_MAX
    assert got.endswith("...")


@given(st.text())
def test_last_error_line_takes_any_text(text: str) -> None:
    got = last_error_line(text)
    if got is not None:
        assert got
        assert "\n" not in got
        assert len(got) <= LAST_ERROR_MAX
        assert got.isprintable()


# --- ports ---------------------------------------------------------------------------------------


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_port_someone_listens_on_is_in_use_and_its_holder_is_named(listening: int) -> None:
    assert port_in_use("127.0.0.1", listening)
    holder = port_holder(listening)
    assert holder is not None
    assert f"(pid {os.getpid()})" in holder
    message = port_in_use_message(listening, "cm HTTPS", "give another with --port")
    assert message.startswith(f"port {listening} (cm HTTPS) is in use by ")
    assert f"pid {os.getpid()}" in message
    assert message.endswith("give another with --port")


def test_a_free_port_is_not_in_use() -> None:
    port = free_port()
    assert not port_in_use("127.0.0.1", port)
    assert port_holder(port) is None


def _cli_default_ports() -> dict[str, int]:
    """Every port a command listens on by default: click options named *port* with a number (or
    "[default: N]" in their help, for options whose default comes from a settings file)."""
    from iotdlm.cli.main import COMMANDS, main

    out: dict[str, int] = {}
    ctx = click.Context(main)

    def walk(cmd: click.Command, path: str) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, f"{path} {name}")
            return
        for param in cmd.params:
            if not isinstance(param, click.Option) or "port" not in (param.name or ""):
                continue
            shown = re.search(r"\[default: (\d+)\]", param.help or "")
            default = param.default if isinstance(param.default, int) else int(shown.group(1)) if shown else None
            if default:
                out[f"{path} {param.opts[0]}"] = default

    for name in COMMANDS:
        command = main.get_command(ctx, name)
        assert command is not None
        walk(command, name)
    return out


def test_default_ports_do_not_collide() -> None:
    """Stumble 5: `repo serve` defaulted to 8443, cm's HTTPS port. Every listener's default is its own."""
    from iotdlm.cm.config import CmConfig, EgressConfig

    ports = _cli_default_ports()
    # cm's options show the defaults of its settings: they say the same
    assert ports["cm serve --https-port"] == CmConfig().https_port
    assert ports["cm serve --http-port"] == CmConfig().http_port
    assert ports["cm serve --egress-port"] == EgressConfig(()).port
    assert ports["init --nats-port"] == DEFAULT_NATS_PORT
    assert "repo serve --port" in ports
    from iotdlm.deployment import DEFAULT_METRICS_PORT

    ports["the supervisor's /metrics (iotdlm.toml metrics_port)"] = DEFAULT_METRICS_PORT
    by_port: dict[int, list[str]] = {}
    for where, port in ports.items():
        by_port.setdefault(port, []).append(where)
    assert {port: where for port, where in by_port.items() if len(where) > 1} == {}


# --- the preflight, on a real deployment -------------------------------------------------------------


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deployment whose CA passphrase `init` generated into DIR/secrets/ca-passphrase."""
    dep, _ = init_deployment(
        tmp_path_factory.mktemp("up") / "site",
        organization="T",
        algorithm=Algorithm.P256,
        dtypes=[DTYPE],
        nats_port=free_port(),
        now=SystemClock().now(),
    )
    with (dep.root / "iotdlm.toml").open("a") as f:  # not 8444: another deployment may hold it
        f.write(f"\n[console]\nport = {free_port()}\n")
    return dep.root


@pytest.fixture
def dep(made: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployment]:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    d = Deployment.load(made)
    yield d
    for extra in ("cm.toml", "pm"):
        path = made / extra
        if path.is_file():
            path.unlink()
        elif path.is_dir():
            for f in sorted(path.rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
    if (made / "logs").is_file():
        (made / "logs").unlink()


def whats(problems: list[Problem]) -> list[str]:
    return [p.what for p in problems]


def test_a_ready_deployment_has_no_problem(dep: Deployment) -> None:
    assert preflight(dep, Mode.PROVISIONING_CERTIFICATE, with_sm=False) == []


def test_a_wrong_passphrase_is_found_before_km_starts(dep: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stumble 3: with $IOTDLM_CA_PASSPHRASE not the one init generated, km crash-looped."""
    monkeypatch.setenv(PASSPHRASE_ENV, "not-the-one")
    problems = preflight(dep, Mode.PROVISIONING_CERTIFICATE, with_sm=False)
    assert whats(problems) == ["CA passphrase"]
    assert not problems[0].unavailable  # exit 4: the configuration is wrong
    assert f"${PASSPHRASE_ENV} does not open the CA keys" in problems[0].message
    assert "secrets/ca-passphrase" in problems[0].message  # what to do: unset it to use the file
    # a wrong passphrase is refused even in a mode without km (switching to one would fail)
    assert whats(preflight(dep, Mode.PROVISIONING_SOFTWARE, with_sm=False)) == ["CA passphrase"]


def test_no_passphrase_matters_only_when_km_runs(dep: Deployment, tmp_path: Path) -> None:
    secret = dep.root / "secrets" / "ca-passphrase"
    kept = tmp_path / "offline"
    secret.rename(kept)
    try:
        assert preflight(dep, Mode.PROVISIONING_SOFTWARE, with_sm=False) == []
        problems = preflight(dep, Mode.CERTIFICATE_MANAGEMENT, with_sm=False)
        assert "CA passphrase" in whats(problems)
        assert PASSPHRASE_ENV in problems[whats(problems).index("CA passphrase")].message
    finally:
        kept.rename(secret)


def test_ports_in_use_are_named_with_their_holder(dep: Deployment) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", dep.config.nats.port))
        s.listen()
        problems = preflight(dep, Mode.PROVISIONING_SOFTWARE, with_sm=False)
    assert whats(problems) == [f"port {dep.config.nats.port}"]
    assert problems[0].unavailable  # exit 3: something else holds it
    assert f"port {dep.config.nats.port} (NATS) is in use by " in problems[0].message
    assert f"pid {os.getpid()}" in problems[0].message
    assert "iotdlm.toml" in problems[0].message


def test_a_taken_console_port_says_which_setting_to_change(dep: Deployment) -> None:
    """Two deployments on one machine both wanted 8444; the loser's console restarted forever."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", dep.config.console.port))
        s.listen()
        problems = preflight(dep, Mode.PROVISIONING_SOFTWARE, with_sm=False)  # every mode runs the console
        # a warning: the console alone stays off, the CA and OCSP start (a UI's port is no reason to stop them)
        assert [(p.what, p.unavailable, p.warning) for p in problems] == [
            (f"port {dep.config.console.port}", True, True)
        ]
        assert "(the operator console) is in use by " in problems[0].message
        assert f"set [console] port in {dep.root / 'iotdlm.toml'}" in problems[0].message
        from iotdlm.cli.common import err_console
        from iotdlm.cli.modes import _preflight

        with err_console.capture() as cap:
            _preflight(dep, Mode.PROVISIONING_SOFTWARE, False, DEFAULT_COMMANDS, None)  # no SystemExit: up goes on
        said = " ".join(cap.get().split())
        assert said.startswith("warning: port ")
        assert "everything but the console starts meanwhile" in said
        # a command table without the console (or `[console] enabled = false`) starts none: no check
        assert preflight(dep, Mode.PROVISIONING_SOFTWARE, with_sm=False, commands=WITHOUT_CONSOLE) == []


def test_cm_ports_come_from_cm_toml(dep: Deployment) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        (dep.root / "cm.toml").write_text(f"https_port = {taken}\nhttp_port = {free_port()}\n")
        problems = preflight(dep, Mode.CERTIFICATE_MANAGEMENT, with_sm=False)
        assert whats(problems) == [f"port {taken}"]
        assert "(cm HTTPS)" in problems[0].message
        assert "https_port" in problems[0].message
        # cm is not in this mode: its ports do not matter
        assert preflight(dep, Mode.PROVISIONING_CERTIFICATE, with_sm=False) == []
    port = free_port()
    (dep.root / "cm.toml").write_text(f"https_port = {port}\nhttp_port = {port}\n")
    problems = preflight(dep, Mode.CERTIFICATE_MANAGEMENT, with_sm=False)
    assert [(p.what, p.unavailable) for p in problems] == [(f"port {port}", False)]
    assert "both set to port" in problems[0].message
    (dep.root / "cm.toml").write_text("https_port = 'eight'\n")
    problems = preflight(dep, Mode.CERTIFICATE_MANAGEMENT, with_sm=False)
    assert whats(problems) == ["cm.toml"]


def test_module_settings_the_mode_needs(dep: Deployment) -> None:
    """Stumble 7: pm crash-looped on a bench folder that does not exist; sm without its set-up."""
    from iotdlm.pm.config import PmConfig, save_config

    save_config(dep.root, DTYPE, PmConfig(bench=str(dep.root / "no-such-bench")))
    problems = preflight(dep, Mode.PROVISIONING_SOFTWARE, with_sm=True)
    assert whats(problems) == ["sm", f"pm-{DTYPE}"]
    assert "sm setup" in problems[0].message
    assert "no-such-bench does not exist" in problems[1].message
    assert f"iotdlm pm setup --data {dep.root} --dtype {DTYPE} --bench DIR" in problems[1].message
    # modules started by the operator's own commands are theirs to check
    own = {**DEFAULT_COMMANDS, "sm": ["sm-wrapper"], "pm": ["pm-wrapper", "{dtype}"]}
    assert preflight(dep, Mode.PROVISIONING_SOFTWARE, with_sm=True, commands=own) == []


def test_a_data_folder_that_is_not_a_folder(dep: Deployment) -> None:
    logs = dep.root / "logs"
    if logs.is_dir():
        logs.rmdir()
    logs.write_text("not a folder")
    problems = preflight(dep, Mode.PROVISIONING_SOFTWARE, with_sm=False)
    assert whats(problems) == [str(logs)]
    assert "is not a folder" in problems[0].message


def test_another_supervisor_is_the_only_problem(dep: Deployment) -> None:
    assert lock_holder(dep.root) is None
    fd = os.open(dep.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, b"4242\n")
        assert lock_holder(dep.root) == 4242
        problems = preflight(dep, Mode.PROVISIONING_SOFTWARE, with_sm=True)
        assert whats(problems) == ["supervisor"]
        assert "another supervisor (pid 4242)" in problems[0].message
        assert f"iotdlm down --data {dep.root}" in problems[0].message
    finally:
        os.close(fd)
    assert lock_holder(dep.root) is None


# --- after `make demo`: iotdlm on PATH (stumble 1) ----------------------------------------------------


def test_path_hint_says_how_to_get_iotdlm_on_path(tmp_path: Path) -> None:
    from iotdlm.cli.demo import path_hint

    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text("")
    exe = venv / "iotdlm"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    hint = path_hint(str(venv / "python"), "/usr/bin:/bin")
    assert hint is not None
    assert f"source {venv}/activate" in hint
    assert "pipx install ." in hint
    assert path_hint(str(venv / "python"), f"{venv}:/usr/bin") is None  # already on PATH
    bare = tmp_path / "usr" / "bin"
    bare.mkdir(parents=True)
    hint = path_hint(str(bare / "python3"), "/nowhere")
    assert hint is not None
    assert "pipx install ." in hint
    assert "activate" not in hint


def test_readme_two_commands_says_how_to_get_iotdlm_on_path() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    assert "source .venv/bin/activate" in section
    assert "pipx install ." in section


# --- `iotdlm down` on the wire --------------------------------------------------------------------


def test_stop_messages_round_trip() -> None:
    from iotdlm.wire import modes as m

    req = m.StopRequest(by="ops@host")
    assert m.decode(m.encode(req), m.StopRequest) == req
    assert m.decode(b"{}", m.StopRequest) == m.StopRequest(by="admin")
    reply = m.StopReply(supervisor_pid=12, stopping=["cm", "km"], embedded_nats=False)
    assert m.decode(m.encode(reply), m.StopReply) == reply


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_a_stop_request_of_any_bytes_is_decoded_or_refused(data: bytes) -> None:
    from iotdlm.errors import BadRequestError
    from iotdlm.wire import modes as m

    try:
        req = m.decode(data, m.StopRequest)
    except BadRequestError:
        return
    assert isinstance(req.by, str)


def test_a_stop_request_with_unknown_fields_is_refused() -> None:
    from iotdlm.errors import BadRequestError
    from iotdlm.wire import modes as m

    with pytest.raises(BadRequestError):
        m.decode(b'{"by": "x", "force": true}', m.StopRequest)
