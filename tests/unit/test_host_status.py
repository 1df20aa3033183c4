"""``DIR/modes.host.json`` (iotdlm.supervisor.host_status): what a ``--services`` supervisor runs, read
back only while that supervisor holds the deployment's lock; anything else in the file is no answer."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotdlm.supervisor import host_status
from iotdlm.wire import modes as m


def _reply(pid: int = 4242) -> m.StatusReply:
    km = m.ServiceHealth(
        name="km", module="km", dtype=None, state="running", pid=99, running=True, restarts=0, uptime=1.5,
        last_exit=None, log="/srv/iotdlm/logs/km.log",
    )  # fmt: skip
    return m.StatusReply(
        mode="certificate-management", since="2026-12-06T00:00:00Z", by="ops", with_sm=False,
        supervisor_pid=pid, nats_url="nats://10.0.0.1:4222", switching=None, services=[km],
    )  # fmt: skip


def test_written_then_read_back_by_the_supervisors_pid_only(tmp_path: Path) -> None:
    host_status.write(tmp_path, ["km"], _reply(os.getpid()))
    got = host_status.read(tmp_path, os.getpid())
    assert got is not None
    assert got.pid == os.getpid()
    assert got.services == ["km"]
    assert got.status == _reply(os.getpid())
    assert (tmp_path / host_status.HOST_STATUS_FILE).stat().st_mode & 0o777 == 0o600
    assert host_status.read(tmp_path, os.getpid() + 1) is None  # a stale file: another pid holds the lock
    assert host_status.read(tmp_path, None) is None  # no supervisor
    assert host_status.read(tmp_path, 0) is None  # one whose pid cannot be read
    assert [p.name for p in tmp_path.iterdir()] == [host_status.HOST_STATUS_FILE]  # no temporary left
    host_status.remove(tmp_path)
    assert host_status.read(tmp_path, os.getpid()) is None
    host_status.remove(tmp_path)  # twice: nothing to do


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_whatever_the_file_holds_reading_it_does_not_raise(tmp_path: Path, data: bytes) -> None:
    (tmp_path / host_status.HOST_STATUS_FILE).write_bytes(data)
    got = host_status.read(tmp_path, os.getpid())
    assert got is None or got.pid == os.getpid()


async def test_kept_written_until_cancelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_status, "EVERY", 0.01)
    asked: list[int] = []
    third = asyncio.Event()

    async def status() -> m.StatusReply:
        asked.append(1)
        if len(asked) == 3:  # the first two answers are written by now
            third.set()
        return _reply(os.getpid())

    task = asyncio.create_task(host_status.keep_written(tmp_path, ["km", "cm"], status))
    await asyncio.wait_for(third.wait(), 10)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    got = host_status.read(tmp_path, os.getpid())
    assert got is not None
    assert got.services == ["cm", "km"]
