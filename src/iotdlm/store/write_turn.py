"""Whose turn it is to write an SQLite database: the processes and threads of one deployment
queue here before ``BEGIN IMMEDIATE`` (issue 15).

SQLite lets one writer in at a time. A writer that finds the lock taken waits in SQLite's busy
handler, which sleeps 1, 2, 5, 10, 15... ms between tries: with two km workers writing a few
hundred times a second, a worker often slept 5-10 ms behind a commit that took 0.25 ms, its
requests queued behind it and its core idle. Here a writer takes, in this order, its process's
turn (a thread lock) and the deployment's turn (an ``flock`` on ``<database>-write.lock``), tried
every 20 us to 0.5 ms, and only then begins; so the lock goes to the next writer a fraction of a
millisecond after a commit. Single requests with 2 km workers: +10-15% certificates/s, p95 -25%
(ADR 0031, docs/benchmarks.md).

A turn is advice, not the lock: a writer that has not had its turn within the busy timeout begins
all the same (SQLite's lock and busy timeout still decide, so nothing waits longer than before
and nothing hangs on a process that is stopped while it holds the turn), and processes that do
not take turns (an older iotdlm, the sqlite3 shell) are still safe, only not queued.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from pathlib import Path

#: the lock file's suffix beside the database file (skipped by backups, like -wal and -shm)
SUFFIX = "-write.lock"
_FIRST_TRY_S = 20e-6
_LAST_TRY_S = 0.5e-3


class WriteTurn:
    """The write turn of one database file, for one process (one :class:`Database`)."""

    def __init__(self, database: Path, patience_s: float) -> None:
        self._thread_turn = threading.Lock()
        self._patience_s = patience_s
        self._fd: int | None = None
        # a folder we cannot write to: turns inside this process only (SQLite says what is wrong);
        # O_CLOEXEC (Python's default): a process started from this one does not hold the turn
        with contextlib.suppress(OSError):
            self._fd = os.open(str(database) + SUFFIX, os.O_RDWR | os.O_CREAT, 0o600)

    def take(self) -> bool:
        """Wait for this thread's turn; False if it did not come within the patience (the writer
        goes on without it, and SQLite's busy timeout decides)."""
        deadline = time.monotonic() + self._patience_s
        if not self._thread_turn.acquire(timeout=self._patience_s):
            return False
        fd = self._fd
        delay = _FIRST_TRY_S
        while fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() + delay > deadline:
                    self._thread_turn.release()
                    return False
                time.sleep(delay)
                delay = min(delay * 2, _LAST_TRY_S)
            except OSError:  # a file system without flock: turns inside this process only
                self._fd = None
                os.close(fd)
                break
        return True

    def give(self) -> None:
        """End a turn :meth:`take` gave (after the commit or rollback)."""
        fd = self._fd
        if fd is not None:
            with contextlib.suppress(OSError):  # closed meanwhile (the store's close): no lock left to give
                fcntl.flock(fd, fcntl.LOCK_UN)
        self._thread_turn.release()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
