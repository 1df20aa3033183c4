"""Several threads, and several processes, on one database (SQLite file or PostgreSQL schema)."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.synchronize import Barrier

import pytest

from iotdlm import errors
from iotdlm.store import Store
from tests.fixtures_store import T0, make_cert

BATCHES = 10
BATCH = 50


def _insert_range(store: Store, first: int, issuer: str = "CN=Test Issuing CA") -> None:
    for b in range(BATCHES):
        base = first + b * BATCH
        store.add_certificates([make_cert(s, issuer=issuer) for s in range(base, base + BATCH)])


def _run_together(n: int, work: Callable[[int], object]) -> list[object]:
    barrier = threading.Barrier(n)

    def start(i: int) -> object:
        barrier.wait()
        return work(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(start, range(n)))


def test_threads_insert_distinct_serials_concurrently(store: Store) -> None:
    _run_together(2, lambda i: _insert_range(store, 1 + i * 1_000_000))
    assert store.count_certificates() == 2 * BATCHES * BATCH
    for first in (1, 1_000_001):
        assert store.get_certificate("CN=Test Issuing CA", first + BATCHES * BATCH - 1) is not None


def test_threads_racing_on_one_nonce_let_exactly_one_through(store: Store) -> None:
    def attempt(_i: int) -> bool:
        try:
            store.consume_nonce("sender", "the-nonce", expires_at=T0)
        except errors.ReplayError:
            return False
        return True

    outcomes = _run_together(8, attempt)
    assert outcomes.count(True) == 1


def test_threads_racing_on_one_serial_let_exactly_one_through(store: Store) -> None:
    def attempt(i: int) -> bool:
        try:
            store.add_certificates([make_cert(77, der=f"racer {i}".encode())])
        except errors.ConflictError:
            return False
        return True

    outcomes = _run_together(6, attempt)
    assert outcomes.count(True) == 1
    assert store.count_certificates() == 1


# --- processes -------------------------------------------------------------------------------------

PROCESSES = 4
NONCES = 40


def _process_worker(url: str, index: int, barrier: Barrier, results: multiprocessing.Queue[object]) -> None:
    """Open (and migrate) at the same moment as the others, insert a serial range, race for nonces."""
    try:
        barrier.wait(timeout=60)
        with Store.open(url) as store:
            _insert_range(store, 1 + index * 1_000_000, issuer=f"CN=CA {index % 2}")
            won = 0
            for n in range(NONCES):
                try:
                    store.consume_nonce("shared", f"n{n}", expires_at=T0)
                    won += 1
                except errors.ReplayError:
                    pass
        results.put(won)
    except BaseException as exc:  # report anything to the parent, which asserts
        results.put(f"{type(exc).__name__}: {exc}")


def test_processes_migrate_and_write_one_database_at_once(store_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    results: multiprocessing.Queue[object] = ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(store_url, i, barrier, results)) for i in range(PROCESSES)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=240) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors_seen = [o for o in outcomes if isinstance(o, str)]
    assert errors_seen == []
    assert sum(o for o in outcomes if isinstance(o, int)) == NONCES  # every nonce used exactly once
    with Store.open(store_url) as store:
        assert store.count_certificates() == PROCESSES * BATCHES * BATCH
        assert store.count_certificates(issuer="CN=CA 1") == (PROCESSES // 2) * BATCHES * BATCH


async def test_async_callers_via_to_thread(store: Store) -> None:
    """What services do: asyncio.to_thread around the synchronous store."""

    async def one(i: int) -> None:
        await asyncio.to_thread(store.add_certificates, [make_cert(s) for s in range(i * 1000 + 1, i * 1000 + 101)])
        await asyncio.to_thread(store.consume_nonce, "s", f"n{i}", expires_at=T0)

    await asyncio.gather(*(one(i) for i in range(4)))
    assert store.count_certificates() == 400
    with pytest.raises(errors.ReplayError):
        await asyncio.to_thread(store.consume_nonce, "s", "n0", expires_at=T0)
