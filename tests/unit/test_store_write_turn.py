"""SQLite writers take turns (iotdlm.store.write_turn, issue 15): the processes and threads of one
deployment queue for the write lock instead of sleeping in SQLite's busy handler; a turn that
does not come within the patience never holds a write back for good."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

from iotdlm.cli.backup_archive import SKIPPED
from iotdlm.store import Store
from iotdlm.store.write_turn import SUFFIX, WriteTurn
from tests.fixtures_store import make_cert


def _held_elsewhere(lock_file: Path) -> int:
    """The turn held by another open file (as another process holds it: flock is per open file)."""
    fd = os.open(lock_file, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_writer_waits_for_the_turn_and_goes_when_it_is_given(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    mine, other = WriteTurn(db, patience_s=10), WriteTurn(db, patience_s=10)  # two processes' turns
    assert (tmp_path / f"x.db{SUFFIX}").stat().st_mode & 0o777 == 0o600
    assert mine.take()
    took: list[bool] = []
    waiter = threading.Thread(target=lambda: took.append(other.take()))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # still waiting: the turn is mine
    assert took == []
    mine.give()
    waiter.join(10)
    assert took == [True]
    other.give()
    mine.close()
    other.close()


def test_threads_of_one_process_take_turns(tmp_path: Path) -> None:
    turn = WriteTurn(tmp_path / "x.db", patience_s=10)
    inside = 0
    most = 0
    guard = threading.Lock()

    def write() -> None:
        nonlocal inside, most
        for _ in range(200):
            assert turn.take()
            with guard:
                inside += 1
                most = max(most, inside)
            time.sleep(0)  # let the other threads run: without turns one of them gets in here
            with guard:
                inside -= 1
            turn.give()

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert most == 1
    turn.close()


def test_a_turn_that_does_not_come_in_time_lets_the_write_go_on(tmp_path: Path) -> None:
    """A process stopped while it holds the turn (but not SQLite's lock) must not stop the
    others' writes: after the patience they go on without it, and SQLite's lock decides."""
    store = Store.open(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        turn = store._turn  # the test shortens the patience of this store's turn
        assert turn is not None
        turn._patience_s = 0.2
        fd = _held_elsewhere(tmp_path / f"x.db{SUFFIX}")
        try:
            assert turn.take() is False  # not within 0.2 s, and no thread turn left behind
            store.add_certificates([make_cert(1)])  # goes on without the turn
            assert store.get_certificate("CN=Test Issuing CA", 1) is not None
        finally:
            os.close(fd)
        assert turn.take() is True  # free again
        turn.give()
    finally:
        store.close()


def test_a_folder_without_the_lock_file_still_takes_turns_inside_the_process(tmp_path: Path) -> None:
    turn = WriteTurn(tmp_path / "missing" / "x.db", patience_s=0.2)
    assert turn.take()
    assert turn.take() is False  # the thread turn is held
    turn.give()
    assert turn.take()
    turn.give()
    turn.close()


def test_the_lock_file_is_not_backed_up() -> None:
    assert f"db/iotdlm.db{SUFFIX}" in SKIPPED


@pytest.mark.postgres
def test_postgres_takes_no_turns(postgres_url: str) -> None:
    store = Store.open(postgres_url)
    try:
        assert store._turn is None  # PostgreSQL's own locks queue its writers
    finally:
        store.close()
