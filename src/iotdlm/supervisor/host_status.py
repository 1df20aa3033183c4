"""What a ``--services`` supervisor runs, in a file of its data folder, for ``iotdlm status`` and
``iotdlm down`` on that host.

The bus's ``status`` and ``stop`` requests are answered by the one supervisor of a whole deployment;
a host that runs only part of it (``iotdlm up --services km``) does not answer them, since every host
shares the subjects. Asked on the bus, ``down`` on such a host would stop whichever whole supervisor
listens on the cluster, on another machine. So a ``--services`` supervisor writes
``DIR/modes.host.json`` (its pid, the services it runs and its status, every :data:`EVERY` seconds),
and the CLI on that host reads it, and stops that supervisor with SIGTERM by its pid, which is how such
a host stops anyway (it leaves the mode in the bucket for the other hosts). The file goes when the
supervisor stops; a stale one (its pid no longer holds ``DIR/modes.lock``) is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec

from iotdlm import errors
from iotdlm.wire import modes as m

log = logging.getLogger(__name__)

HOST_STATUS_FILE = "modes.host.json"
#: seconds between two writes (each service's state, pid and restarts move between them)
EVERY = 2.0


class HostStatus(msgspec.Struct, frozen=True):
    """``DIR/modes.host.json``."""

    pid: int
    services: list[str]
    written_at: str
    status: m.StatusReply


def write(root: Path, services: list[str], status: m.StatusReply) -> None:
    """Replace the file in one step (a reader sees the old one or the new one, never half)."""
    body = msgspec.json.encode(
        HostStatus(
            pid=os.getpid(),
            services=sorted(services),
            written_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            status=status,
        )
    )
    tmp = root / f".{HOST_STATUS_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(body)
    os.replace(tmp, root / HOST_STATUS_FILE)


def read(root: Path, holder: int | None) -> HostStatus | None:
    """The file, when the supervisor that wrote it is ``holder`` (the pid holding ``DIR/modes.lock``);
    None without a file, with one left by a supervisor that is gone, or with one that does not parse."""
    if not holder:
        return None
    try:
        got = msgspec.json.decode((root / HOST_STATUS_FILE).read_bytes(), type=HostStatus)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    return got if got.pid == holder else None


def remove(root: Path) -> None:
    with contextlib.suppress(OSError):
        (root / HOST_STATUS_FILE).unlink()


async def keep_written(root: Path, services: list[str], status: Callable[[], Awaitable[m.StatusReply]]) -> None:
    """Write the file now and every :data:`EVERY` seconds until cancelled."""
    while True:
        try:
            await asyncio.to_thread(write, root, services, await status())
        except (OSError, errors.IotdlmError) as exc:  # a full disk: `status` here reads an older file
            log.warning("cannot write %s: %s", root / HOST_STATUS_FILE, exc)
        await asyncio.sleep(EVERY)
