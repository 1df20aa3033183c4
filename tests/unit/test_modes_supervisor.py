"""The supervisor's pure parts: restart policy, settings, mode.json, command files, messages."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import msgspec
import pytest

from iotdlm.errors import BadRequestError, NotFoundError
from iotdlm.modes.table import DEFAULT_COMMANDS
from iotdlm.supervisor.processes import RestartPolicy, SupervisorSettings
from iotdlm.supervisor.setup import read_commands
from iotdlm.supervisor.supervisor import load_saved_mode, save_mode
from iotdlm.wire import modes as m

FAST = SupervisorSettings(backoff_initial=1.0, backoff_max=8.0, quick_crash=10.0, give_up_after=5)


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = RestartPolicy(SupervisorSettings(backoff_initial=1.0, backoff_max=8.0, give_up_after=100))
    assert [policy.after_exit(0.1) for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_gives_up_after_n_quick_crashes_in_a_row() -> None:
    policy = RestartPolicy(FAST)
    delays = [policy.after_exit(0.5) for _ in range(5)]
    assert delays[:4] == [1.0, 2.0, 4.0, 8.0]
    assert delays[4] is None
    assert policy.quick_crashes == 5


def test_a_long_run_resets_the_count_and_the_backoff() -> None:
    policy = RestartPolicy(FAST)
    for _ in range(4):
        assert policy.after_exit(0.5) is not None
    assert policy.after_exit(60.0) == 1.0  # ran fine for a minute: a fresh start
    assert policy.quick_crashes == 0
    assert [policy.after_exit(0.5) for _ in range(4)] == [2.0, 4.0, 8.0, 8.0]
    assert policy.after_exit(0.5) is None


def test_give_up_after_one_means_no_restart_after_a_quick_crash() -> None:
    policy = RestartPolicy(SupervisorSettings(give_up_after=1))
    assert policy.after_exit(0.0) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stop_timeout": 0},
        {"backoff_initial": -1},
        {"backoff_initial": 5, "backoff_max": 1},
        {"give_up_after": 0},
        {"quick_crash": 0},
    ],
)
def test_settings_refuse_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must"):
        SupervisorSettings(**kwargs)  # type: ignore[arg-type]


def test_mode_file_round_trip_and_atomic_replace(tmp_path: Path) -> None:
    assert load_saved_mode(tmp_path) is None
    first = m.SavedMode(mode="provisioning-software", since="2025-01-01T00:00:00+00:00", by="ops", with_sm=True)
    save_mode(tmp_path, first)
    assert load_saved_mode(tmp_path) == first
    second = m.SavedMode(mode="certificate-management", since="2025-01-02T00:00:00+00:00", by="ops")
    save_mode(tmp_path, second)
    assert load_saved_mode(tmp_path) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mode.json"]  # no temporary left behind


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"[]", b'{"mode": "maintenance", "since": "x", "by": "y"}', b'{"mode": 1, "since": "x", "by": "y"}'],
)
def test_a_damaged_mode_file_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "mode.json").write_bytes(content)
    with pytest.raises(BadRequestError):
        load_saved_mode(tmp_path)


def test_read_commands_merges_over_the_defaults(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"km": ["{python}", "-c", "print('km')", "{data}"]}))
    table = read_commands(f)
    assert table["km"] == ["{python}", "-c", "print('km')", "{data}"]
    assert table["pm"] == list(DEFAULT_COMMANDS["pm"])


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("[]", "JSON object"),
        ('{"nats": ["x"]}', "unknown module"),
        ('{"km": "python -m x"}', "list of strings"),
        ('{"km": []}', "list of strings"),
        ("{", "cannot read"),
    ],
)
def test_read_commands_refuses_bad_files(tmp_path: Path, content: str, why: str) -> None:
    f = tmp_path / "c.json"
    f.write_text(content)
    with pytest.raises(BadRequestError, match=why):
        read_commands(f)


# --- messages -----------------------------------------------------------------------------------


def test_mode_record_is_the_documented_json() -> None:
    rec = m.ModeRecord(mode="provisioning-certificate", since="2025-01-01T00:00:00+00:00", by="ops@host")
    assert json.loads(m.encode(rec)) == {
        "mode": "provisioning-certificate",
        "since": "2025-01-01T00:00:00+00:00",
        "by": "ops@host",
    }
    # a newer supervisor may add fields: readers ignore them
    newer = b'{"mode":"software-management","since":"s","by":"b","epoch":7}'
    assert m.decode(newer, m.ModeRecord).mode == "software-management"


def test_set_reply_names_from_on_the_wire() -> None:
    reply = m.SetReply(from_mode=None, to="software-management", with_sm=False, since="s", started=["sm", "cm"])
    wire = json.loads(m.encode(reply))
    assert wire["from"] is None
    assert wire["started"] == ["sm", "cm"]
    assert m.decode(m.encode(reply), m.SetReply) == reply
    assert reply.changed
    same = m.SetReply(from_mode="software-management", to="software-management", with_sm=False, since="s")
    assert not same.changed


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"null",
        b'{"mode": "x", "extra": 1}',  # requests refuse unknown fields
        b'{"mode": 5}',
        b'{"with_sm": true}',
        b'{"mode": "x", "with_sm": "yes"}',
        b"{" + b" " * (m.MAX_MESSAGE + 1) + b"}",
    ],
)
def test_hostile_set_requests_are_bad_requests(data: bytes) -> None:
    with pytest.raises(BadRequestError):
        m.decode(data, m.SetRequest)


def test_timestamps_are_utc_and_need_a_zone() -> None:
    at = dt.datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert m.timestamp(at) == "2025-03-01T10:00:00+00:00"
    with pytest.raises(ValueError, match="timezone"):
        m.timestamp(dt.datetime(2025, 3, 1))


def test_status_reply_round_trip() -> None:
    st = m.StatusReply(
        mode="certificate-management",
        since="s",
        by="b",
        with_sm=False,
        supervisor_pid=1,
        nats_url="nats://127.0.0.1:1",
        switching=None,
        services=[
            m.ServiceHealth(
                name="km",
                module="km",
                dtype=None,
                state="running",
                pid=2,
                running=True,
                restarts=0,
                uptime=1.5,
                last_exit=None,
                log="/l",
            )
        ],
    )
    assert msgspec.json.decode(m.encode(st), type=m.StatusReply) == st


def test_ensure_identity_upgrades_a_deployment_made_before_modes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from iotdlm.clock import SystemClock
    from iotdlm.deployment import PASSPHRASE_ENV, Deployment, init_deployment
    from iotdlm.pki.keys import Algorithm
    from iotdlm.supervisor.setup import ensure_identity

    clock = SystemClock()
    made, _ = init_deployment(
        tmp_path / "d", organization="T", algorithm=Algorithm.P256, dtypes=["b"], passphrase=b"pw", now=clock.now()
    )
    assert not ensure_identity(made, clock)  # init made it already
    shutil.rmtree(made.root / "modules" / "modes")  # as a deployment from before modes existed
    dep = Deployment.load(made.root)
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    with pytest.raises(NotFoundError, match="passphrase"):
        ensure_identity(dep, clock)
    monkeypatch.setenv(PASSPHRASE_ENV, "pw")
    assert ensure_identity(dep, clock)
    ident = dep.identity("modes")
    assert ident.module == "modes"
    assert ("modes", ident.nats) in [(m, c) for m, c in dep.nats_users()]
