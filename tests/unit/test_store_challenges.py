"""SP2's attestation challenges in the store (issue 13), on SQLite and on PostgreSQL (``store``
fixture): any worker takes what another issued, once; a device keeps a bounded number; expired
ones are forgotten."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from iotdlm.store import Store
from iotdlm.store.challenges import ChallengeRecord
from tests.fixtures_store import T0

TTL = dt.timedelta(minutes=5)


def _rec(device_id: str, n: int, at: dt.datetime = T0) -> ChallengeRecord:
    return ChallengeRecord(device_id, bytes([n]) * 16, at, at + TTL)


def test_a_challenge_is_taken_once_and_only_with_its_nonce(store: Store) -> None:
    store.put_challenge(_rec("d1", 1), keep=4)
    assert store.take_challenge("d1", bytes([2]) * 16) is None  # not the nonce issued
    assert store.take_challenge("d2", bytes([1]) * 16) is None  # not the device it was issued to
    assert store.take_challenge("d1", bytes([1]) * 16) == _rec("d1", 1)
    assert store.take_challenge("d1", bytes([1]) * 16) is None  # single use
    assert store.count_challenges("d1") == 0


def test_another_store_on_the_same_database_takes_it(store: Store, store_url: str) -> None:
    """Another km worker, or km after a restart: a second Store on the same database."""
    store.put_challenge(_rec("d1", 1), keep=4)
    with Store.open(store_url) as other:
        assert other.take_challenge("d1", bytes([1]) * 16) == _rec("d1", 1)
    assert store.take_challenge("d1", bytes([1]) * 16) is None


def test_a_device_keeps_only_its_newest_challenges(store: Store) -> None:
    for n in range(1, 8):
        store.put_challenge(_rec("d1", n, T0 + dt.timedelta(seconds=n)), keep=3)
    store.put_challenge(_rec("d2", 1), keep=3)
    assert store.count_challenges("d1") == 3
    assert store.count_challenges("d2") == 1  # another device's are its own
    for n in range(1, 5):
        assert store.take_challenge("d1", bytes([n]) * 16) is None, n
    for n in range(5, 8):
        assert store.take_challenge("d1", bytes([n]) * 16) is not None, n
    with pytest.raises(ValueError, match="keep"):
        store.put_challenge(_rec("d1", 9), keep=0)


def test_expired_challenges_are_forgotten(store: Store) -> None:
    store.put_challenge(_rec("d1", 1), keep=4)
    store.put_challenge(_rec("d2", 1, T0 + dt.timedelta(minutes=1)), keep=4)
    # issuing after d1's expired drops it (any device's issuing does)
    store.put_challenge(_rec("d3", 1, T0 + TTL), keep=4)
    assert store.count_challenges("d1") == 0
    assert store.count_challenges("d2") == 1
    assert store.purge_challenges(T0 + TTL + dt.timedelta(minutes=1)) == 1
    assert store.count_challenges("d2") == 0
    assert store.count_challenges("d3") == 1


def test_impossible_keys_find_nothing_and_bad_records_are_refused(store: Store) -> None:
    assert store.take_challenge("d\x00", bytes(16)) is None
    assert store.take_challenge("x" * 300, bytes(16)) is None
    assert store.take_challenge("d1", b"short") is None
    assert store.count_challenges("x" * 300) == 0
    for bad in (
        lambda: ChallengeRecord("d1", b"short", T0, T0 + TTL),
        lambda: ChallengeRecord("d1", bytes(16), T0, T0),
        lambda: ChallengeRecord("d1", bytes(16), T0.replace(tzinfo=None), T0 + TTL),
        lambda: ChallengeRecord("", bytes(16), T0, T0 + TTL),
    ):
        with pytest.raises(ValueError):  # noqa: PT011 -- each says what is wrong; the cases differ
            bad()


def test_two_workers_taking_one_challenge_at_once_one_gets_it(store: Store) -> None:
    for n in range(1, 21):
        store.put_challenge(_rec(f"d{n}", n), keep=4)
    got: list[ChallengeRecord | None] = []
    lock = threading.Lock()

    def take(device: str, n: int) -> None:
        r = store.take_challenge(device, bytes([n]) * 16)
        with lock:
            got.append(r)

    threads = [threading.Thread(target=take, args=(f"d{n}", n)) for n in range(1, 21) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len([g for g in got if g is not None]) == 20
    assert len(got) == 60
