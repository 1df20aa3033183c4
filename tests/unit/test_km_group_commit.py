"""Group commit (ADR 0021): concurrent requests' records in one transaction, each caller answered
only after its own records committed, and one bad request failing alone -- from worker threads, and
from handlers on the event loop (ADR 0032)."""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import threading
import time
from collections.abc import Callable, Sequence

import pytest

from iotdlm.errors import ReplayError, UnavailableError
from iotdlm.km.groupcommit import GroupCommit, run_on_loop
from iotdlm.store import AuditEntry, NonceUse, SerialCollisionError, Store
from iotdlm.store.records import CertWrite
from iotdlm.wire import audit as wire_audit
from tests.fixtures_store import make_cert

NOW = dt.datetime(2026, 11, 21, 12, tzinfo=dt.UTC)


def _write(serial: int, nonce: str, device: str | None = None) -> CertWrite:
    device_id = device or f"d{serial}"
    return CertWrite(
        (make_cert(serial, device_id=device_id),),
        audit=(AuditEntry(at=NOW, kind="issuance", actor="pm[a]", subject=f"s{serial}", data={"n": serial}),),
        devices=((device_id, "boardA"),),
        nonce=NonceUse("fp-pm", nonce, NOW + dt.timedelta(minutes=5)),
        now=NOW,
    )


def _wait_until(cond: Callable[[], bool]) -> None:
    for _ in range(2000):
        if cond():
            return
        time.sleep(0.005)
    raise AssertionError("the condition never held")


class _Gated:
    """``write`` that holds its first call until released, so that the others queue behind it."""

    def __init__(self, write: Callable[[Sequence[CertWrite]], None]) -> None:
        self.inner = write
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls: list[int] = []

    def __call__(self, items: Sequence[CertWrite]) -> None:
        first = not self.calls
        self.calls.append(len(items))
        if first:
            self.started.set()
            assert self.release.wait(30)
        self.inner(items)


def _run_group(gc: GroupCommit[CertWrite], gated: _Gated, first: CertWrite, rest: list[CertWrite]) -> list[object]:
    """Submit ``first``, then ``rest`` while ``first`` is being written; each thread's outcome."""
    out: list[object] = [None] * (1 + len(rest))

    def submit(i: int, w: CertWrite) -> None:
        try:
            out[i] = gc.submit(w)
        except Exception as exc:
            out[i] = exc

    threads = [threading.Thread(target=submit, args=(0, first))]
    threads[0].start()
    assert gated.started.wait(30)
    for i, w in enumerate(rest, start=1):
        threads.append(threading.Thread(target=submit, args=(i, w)))
        threads[-1].start()
    _wait_until(lambda: gc.waiting == len(rest))
    gated.release.set()
    for t in threads:
        t.join(30)
    return out


def _chain_ok(store: Store) -> int:
    prev, n = wire_audit.GENESIS_HASH, 0
    for rec in store.iter_audit():
        n += 1
        assert (rec.seq, rec.prev_hash) == (n, prev)
        assert rec.hash == wire_audit.record_hash(
            prev, rec.seq, rec.at, rec.kind, rec.actor, rec.subject, rec.data_json
        )
        prev = rec.hash
    return n


def test_requests_queued_behind_a_commit_share_the_next_transaction(store: Store) -> None:
    gated = _Gated(store.add_certificate_writes)
    gc: GroupCommit[CertWrite] = GroupCommit(gated)
    out = _run_group(gc, gated, _write(1, "n-1"), [_write(i, f"n-{i}") for i in range(2, 7)])
    assert out == [1, 5, 5, 5, 5, 5]  # the first alone, the five that waited in one transaction
    assert gated.calls == [1, 5]
    assert (gc.transactions, gc.items) == (2, 6)
    assert store.count_certificates() == 6
    assert sorted(store.get_devices([f"d{i}" for i in range(1, 7)])) == [f"d{i}" for i in range(1, 7)]
    assert _chain_ok(store) == 6


def test_a_replay_in_a_group_fails_alone_and_stores_nothing(store: Store) -> None:
    store.consume_nonce("fp-pm", "used", expires_at=NOW + dt.timedelta(minutes=5))
    gated = _Gated(store.add_certificate_writes)
    gc: GroupCommit[CertWrite] = GroupCommit(gated)
    rest = [_write(2, "n-2"), _write(3, "used"), _write(4, "n-4")]
    out = _run_group(gc, gated, _write(1, "n-1"), rest)
    assert out[0] == 1
    assert out[1] == 1
    assert out[3] == 1
    assert isinstance(out[2], ReplayError)
    assert gated.calls == [1, 3, 1, 1, 1]
    assert store.get_certificate(make_cert(3).issuer, 3) is None
    assert store.get_device("d3") is None
    assert store.count_certificates() == 3
    assert _chain_ok(store) == 3


def test_a_serial_collision_in_a_group_fails_alone(store: Store) -> None:
    gated = _Gated(store.add_certificate_writes)
    gc: GroupCommit[CertWrite] = GroupCommit(gated)
    out = _run_group(gc, gated, _write(1, "n-1"), [_write(2, "n-2"), _write(1, "n-3", device="dx")])
    assert out[:2] == [1, 1]
    assert isinstance(out[2], SerialCollisionError)
    assert store.get_device("dx") is None
    store.consume_nonce("fp-pm", "n-3", expires_at=NOW)  # the refused request did not spend it
    assert _chain_ok(store) == 2


def test_many_threads_all_stored_once_with_an_unbroken_chain(store: Store) -> None:
    gc: GroupCommit[CertWrite] = GroupCommit(store.add_certificate_writes, max_group=8)
    start = threading.Barrier(16)
    sizes: list[int] = []

    def worker(k: int) -> None:
        start.wait()
        for j in range(10):
            n = 1000 + k * 10 + j
            sizes.append(gc.submit(_write(n, f"n-{n}")))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(sizes) == 160
    assert max(sizes) <= 8
    assert gc.items == 160
    assert store.count_certificates() == 160
    assert _chain_ok(store) == 160


def test_an_error_that_is_not_the_store_s_reaches_its_caller() -> None:
    def write(items: Sequence[int]) -> None:
        if 13 in items:
            raise RuntimeError("unlucky")

    gc: GroupCommit[int] = GroupCommit(write)
    assert gc.submit(1) == 1
    with pytest.raises(RuntimeError, match="unlucky"):
        gc.submit(13)
    with pytest.raises(ValueError, match="max_group"):
        GroupCommit(write, max_group=0)


def test_a_database_failure_is_every_member_s_without_writing_each_again() -> None:
    calls: list[list[int]] = []
    first_started, release = threading.Event(), threading.Event()

    def write(items: Sequence[int]) -> None:
        calls.append(list(items))
        if len(calls) == 1:
            first_started.set()
            assert release.wait(30)
            return
        raise UnavailableError("the database did not answer")

    gc: GroupCommit[int] = GroupCommit(write, shared=lambda exc: isinstance(exc, UnavailableError))
    out: dict[int, object] = {}

    def submit(i: int) -> None:
        try:
            out[i] = gc.submit(i)
        except UnavailableError as exc:
            out[i] = exc

    threads = [threading.Thread(target=submit, args=(0,))]
    threads[0].start()
    assert first_started.wait(30)
    threads += [threading.Thread(target=submit, args=(i,)) for i in (1, 2, 3)]
    for t in threads[1:]:
        t.start()
    _wait_until(lambda: gc.waiting == 3)
    release.set()
    for t in threads:
        t.join(30)
    assert out[0] == 1
    assert all(isinstance(out[i], UnavailableError) for i in (1, 2, 3))
    assert calls == [[0], [1, 2, 3]]  # not written again one by one


# --- on the event loop (ADR 0032): handlers in greenlets, one commit callback per loop turn ----------


async def test_requests_on_the_loop_that_arrive_together_share_one_transaction(store: Store) -> None:
    gc: GroupCommit[CertWrite] = GroupCommit(store.add_certificate_writes)
    out = await asyncio.gather(*(run_on_loop(gc.submit, _write(i, f"n-{i}")) for i in range(1, 7)))
    assert out == [6] * 6  # each returned after its records committed, all six in one transaction
    assert (gc.transactions, gc.items) == (1, 6)
    assert store.count_certificates() == 6
    assert _chain_ok(store) == 6
    assert await run_on_loop(gc.submit, _write(7, "n-7")) == 1  # alone: committed at once, alone
    assert _chain_ok(store) == 7


async def test_on_the_loop_a_replay_fails_alone_and_the_loop_keeps_answering(store: Store) -> None:
    store.consume_nonce("fp-pm", "used", expires_at=NOW + dt.timedelta(minutes=5))
    gc: GroupCommit[CertWrite] = GroupCommit(store.add_certificate_writes, max_group=2)
    ticks: list[int] = []

    async def ticker() -> None:  # something else the loop runs meanwhile: the commits that had begun
        for _ in range(3):
            ticks.append(gc.transactions)
            await asyncio.sleep(0)

    writes = [_write(1, "n-1"), _write(2, "used"), _write(3, "n-3")]
    out = await asyncio.gather(*(run_on_loop(gc.submit, w) for w in writes), ticker(), return_exceptions=True)
    assert out[0] == 1  # max_group 2: [1, replay] failed together, then each alone
    assert isinstance(out[1], ReplayError)
    assert out[2] == 1
    assert len(ticks) == 3
    assert ticks[0] == 0  # it ran while the three waited for their commit: the loop was not blocked
    assert store.count_certificates() == 2
    assert store.get_device("d2") is None
    assert _chain_ok(store) == 2


async def test_on_the_loop_the_commit_waits_for_a_thread_s_commit(store: Store) -> None:
    gated = _Gated(store.add_certificate_writes)
    gc: GroupCommit[CertWrite] = GroupCommit(gated)
    thread_out: list[int] = []
    thread = threading.Thread(target=lambda: thread_out.append(gc.submit(_write(1, "n-1"))))
    thread.start()
    assert gated.started.wait(30)  # a batch's commit in a worker thread is being written
    threading.Timer(0.2, gated.release.set).start()
    out = await asyncio.gather(run_on_loop(gc.submit, _write(2, "n-2")), run_on_loop(gc.submit, _write(3, "n-3")))
    thread.join(30)
    assert thread_out == [1]
    assert out == [2, 2]
    assert gated.calls == [1, 2]
    assert _chain_ok(store) == 3


async def test_run_on_loop_returns_raises_and_hands_errors_in() -> None:
    def plain(x: int) -> int:
        return x * 2

    def fails() -> None:
        raise ValueError("bad input")

    assert await run_on_loop(plain, 21) == 42  # nothing to wait for: no switch at all
    with pytest.raises(ValueError, match="bad input"):
        await run_on_loop(fails)

    def write(items: Sequence[int]) -> None:
        raise UnavailableError("the database did not answer")

    gc: GroupCommit[int] = GroupCommit(write, shared=lambda exc: isinstance(exc, UnavailableError))
    out = await asyncio.gather(*(run_on_loop(gc.submit, i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(o, UnavailableError) for o in out)
    assert gc.transactions == 1  # the database's failure is everyone's: not written again one by one
    # outside run_on_loop (a worker thread, the CLI) submit blocks as before
    assert await asyncio.to_thread(GroupCommit(lambda items: None).submit, 5) == 1


async def test_run_on_loop_sees_the_task_s_context_variables() -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    request_id.set("r-1")
    gc: GroupCommit[int] = GroupCommit(lambda items: None)

    def handler() -> str:
        before = request_id.get()
        gc.submit(1)  # a switch to the loop and back
        return before + "/" + request_id.get()

    assert await run_on_loop(handler) == "r-1/r-1"


async def test_a_cancelled_request_on_the_loop_does_not_cancel_the_others(store: Store) -> None:
    gc: GroupCommit[CertWrite] = GroupCommit(store.add_certificate_writes)
    tasks = [asyncio.create_task(run_on_loop(gc.submit, _write(i, f"n-{i}"))) for i in range(1, 4)]
    await asyncio.sleep(0)  # each runs up to its submit
    tasks[0].cancel()  # its caller goes away (km stopping); the request was already on its way
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[0], asyncio.CancelledError)
    assert done[1:] == [3, 3]  # the others answered after their commit, unharmed
    assert store.count_certificates() == 3  # written, as a worker thread would have finished it
    assert _chain_ok(store) == 3
