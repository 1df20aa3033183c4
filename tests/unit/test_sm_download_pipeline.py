"""sm's one-pass download: the hashes and the write run in worker threads beside the receiving.

What must hold whatever the threads do: a sink that fails (the disk full mid-image) stops the
download with that error, never hangs the receiver, and leaves nothing stored or half-written;
the image stored is byte for byte what was signed (Algorithm 2: length and hashes checked before
the file is trusted)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from iotdlm.errors import IotdlmError
from iotdlm.sm import updater
from tests.unit.test_sm_updater import DTYPE, SmEnv, make_env


@pytest.fixture
def env(tmp_path: Path) -> SmEnv:
    return make_env(tmp_path)


def test_a_failing_sink_stops_the_feed_and_close_raises_its_error() -> None:
    seen: list[bytes] = []

    def sink(chunk: bytes) -> None:
        seen.append(chunk)
        if len(seen) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    worker = updater._SinkWorker(sink, depth=2)
    fed = 0
    refused: OSError | None = None
    for i in range(1000):  # far more than the queue holds: the receiver must not block
        try:
            worker.feed(bytes([i % 256]) * 10)
        except OSError as exc:
            refused = exc
            break
        fed += 1
    assert refused is not None
    assert "No space left" in str(refused)
    with pytest.raises(OSError, match="No space left"):
        worker.close()
    assert len(seen) == 2  # nothing reached the sink after its error
    assert fed < 1000


def test_a_sink_without_error_gets_every_chunk_in_order() -> None:
    seen: list[bytes] = []
    worker = updater._SinkWorker(seen.append, depth=3)
    chunks = [os.urandom(17) for _ in range(50)]
    for c in chunks:
        worker.feed(c)
    worker.close()
    assert seen == chunks


def _failing_write(after: int) -> Callable[[Any], Callable[[bytes], None]]:
    real = updater.write_behind

    def make(f: Any) -> Callable[[bytes], None]:
        write = real(f)
        written = 0

        def sink(chunk: bytes) -> None:
            nonlocal written
            if written + len(chunk) > after:
                raise OSError(errno.ENOSPC, "No space left on device")
            write(chunk)
            written += len(chunk)

        return sink

    return make


def test_disk_full_mid_image_leaves_nothing_and_the_next_check_stores(
    env: SmEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.publish(3, data=os.urandom(1_000_000))
    monkeypatch.setattr(updater, "write_behind", _failing_write(after=300_000))
    with pytest.raises(IotdlmError, match=r"local repository I/O failed: .*No space left"):
        env.manager().check(DTYPE)
    assert env.local.counters(DTYPE) == []
    assert env.nothing_staged()
    assert env.repo.reports() == []
    monkeypatch.undo()
    assert env.manager().check(DTYPE).outcome == "stored"


def test_write_behind_hints_keep_the_stored_image_exact(env: SmEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(3_000_000)
    monkeypatch.setattr(updater, "WRITE_BEHIND", 100_000)  # a hint every few chunks
    env.publish(3, data=data)
    result = env.manager().check(DTYPE)
    assert result.outcome == "stored"
    assert env.local.paths(DTYPE, 3).image.read_bytes() == data
