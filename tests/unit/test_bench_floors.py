"""bench/floors.py's arithmetic: each ceiling from made-up parts (nothing here measures or times)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
MS = 1e-3


@pytest.fixture(scope="module")
def floors() -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))
        return importlib.import_module("floors")


def parts(floors: Any, **kw: float) -> Any:
    base = dict.fromkeys(
        ["build_sign", "csr_check", "seal", "verify", "reply_seal", "reply_verify", "ecdsa_sign", "ecdsa_verify",
         "ocsp_parse", "ocsp_sign", "nats_rt", "sqlite_txn", "sqlite_row", "hello_tls", "echo_wall", "csr_wall",
         "sign_wall"],
        0.1 * MS,
    )  # fmt: skip
    return floors.Parts(**(base | {"cores": 2.0, "scaling": 1.9} | kw))


def by_figure(floors: Any, p: Any, hello_one: float = 1000.0, peer_one: float = 1000.0) -> dict[str, Any]:
    return {c.figure: c for c in floors.ceilings(p, hello_one, peer_one)}


def test_every_issue_15_figure_but_cfssl_and_sm_has_a_ceiling_named_as_run_all_names_it(floors: Any) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))
        run_all = importlib.import_module("run_all")
    named = {t.figure for t in run_all.ISSUE15}
    got = set(by_figure(floors, parts(floors)))
    # cfssl_peer.py and sm_download.py give those two, beside what they measure
    assert got == named - {
        "single-request issuance, 16 in flight / cfssl sign",
        "sm verified download + store / openssl dgst -sha256",
    }


def test_single_requests_count_both_signatures_both_verifies_the_round_trip_and_the_rows(floors: Any) -> None:
    c = by_figure(floors, parts(floors))["sustained issuance, batch 1, 2 km workers / raw build+sign"]
    assert c.best == pytest.approx(2.0 * 0.1 / 0.8)  # 8 parts of 0.1 ms on 2 cores against build+sign
    assert floors.reachable(c) == "reachable in principle"  # 0.25x of >= 0.25x


def test_a_batch_shares_the_envelope_work_among_its_hundred(floors: Any) -> None:
    c = by_figure(floors, parts(floors))["sustained issuance, batch 100, 2 km workers / raw"]
    assert c.best == pytest.approx(2.0 * 0.1 / (0.3 + 0.5 / 100))


def test_est_is_two_https_requests_and_two_bus_requests_against_one_hello(floors: Any) -> None:
    c = by_figure(floors, parts(floors))["EST simpleenroll through cm / aiohttp hello, same TLS"]
    assert c.best == pytest.approx(0.1 / (2 * 0.1 + 2 * 0.5 + 0.5))
    assert floors.reachable(c) == "out of reach: the parts alone miss it"


def test_the_wait_of_one_certificate_is_a_lowest_ratio(floors: Any) -> None:
    c = by_figure(floors, parts(floors, sqlite_txn=0.2 * MS))[
        "1 certificate, pm's wait p50 / (NATS echo + CSR verify + sign)"
    ]
    assert c.best == pytest.approx((0.3 + 0.4 + 0.2) / 0.3)
    assert floors.reachable(c) == "met" or floors.reachable(c) == "reachable in principle"
    worse = by_figure(floors, parts(floors, sqlite_txn=1.0 * MS))[
        "1 certificate, pm's wait p50 / (NATS echo + CSR verify + sign)"
    ]
    assert floors.reachable(worse) == "out of reach: the parts alone miss it"  # (0.7 + 1.0) / 0.3 > 3


def test_one_at_a_time_cm_can_be_no_faster_than_a_hello(floors: Any) -> None:
    figure = "OCSP through cm, one at a time / openssl ocsp"
    assert by_figure(floors, parts(floors), hello_one=1200.0, peer_one=1000.0)[figure].best == pytest.approx(1.2)


def test_the_sqlite_floor_writes_an_issuances_rows_into_the_stores_own_schema(
    floors: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The floor's SQL names the store's tables and columns, so a schema change that it no longer
    matches fails here, not silently in make bench; and its rows are what km writes per certificate."""
    import sqlite3

    counts = {
        "nonces": "SELECT count(*) FROM nonces",
        "devices": "SELECT count(*) FROM devices",
        "certificates": "SELECT count(*) FROM certificates",
        "audit_log": "SELECT count(*) FROM audit_log",
    }
    written: dict[str, int] = {}
    real_close = sqlite3.Connection.close

    class Counting(sqlite3.Connection):
        def close(self) -> None:
            for table, query in counts.items():
                written[table] = self.execute(query).fetchone()[0]
            real_close(self)

    real_connect = sqlite3.connect
    monkeypatch.setattr(floors.sqlite3, "connect", lambda *a, **kw: real_connect(*a, factory=Counting, **kw))
    one, per_row = floors.sqlite_parts(10)
    assert one > 0
    assert per_row > 0
    assert written["certificates"] == written["devices"] == written["audit_log"] > 100
    assert 0 < written["nonces"] < written["certificates"]  # one per request, a request of 1 or of 100
