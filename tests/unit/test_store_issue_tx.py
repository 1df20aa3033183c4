"""One write per request: certificates, audit, new devices and the nonce commit together or not at all."""

from __future__ import annotations

import datetime as dt

import pytest

from iotdlm.errors import ReplayError
from iotdlm.store import AuditEntry, NonceUse, SerialCollisionError, Store
from tests.fixtures_store import make_cert

NOW = dt.datetime(2026, 11, 21, 12, tzinfo=dt.UTC)


def _audit(n: int) -> AuditEntry:
    return AuditEntry(at=NOW, kind="issuance", actor="pm[a]", subject=f"s{n}", data={"n": n})


def test_everything_in_one_transaction(store: Store) -> None:
    nonce = NonceUse("fp-pm", "nonce-0001", NOW + dt.timedelta(minutes=5))
    store.add_certificates(
        [make_cert(1, device_id="d1"), make_cert(2, device_id="d2")],
        audit=[_audit(1), _audit(2)],
        devices=[("d1", "boardA"), ("d2", "boardA")],
        nonce=nonce,
        now=NOW,
    )
    assert store.count_certificates() == 2
    assert sorted(store.get_devices(["d1", "d2", "d3"])) == ["d1", "d2"]
    assert store.count_audit() == 2
    # the same nonce again: nothing of the second request is stored
    with pytest.raises(ReplayError):
        store.add_certificates(
            [make_cert(3, device_id="d3")], audit=[_audit(3)], devices=[("d3", "boardA")], nonce=nonce, now=NOW
        )
    assert store.count_certificates() == 2
    assert store.get_device("d3") is None
    assert store.count_audit() == 2


def test_collision_rolls_back_devices_and_nonce(store: Store) -> None:
    store.add_certificates([make_cert(1)])
    nonce = NonceUse("fp-pm", "nonce-0002", NOW + dt.timedelta(minutes=5))
    with pytest.raises(SerialCollisionError):
        store.add_certificates([make_cert(1, device_id="d9")], devices=[("d9", "b")], nonce=nonce, now=NOW)
    assert store.get_device("d9") is None
    store.consume_nonce("fp-pm", "nonce-0002", expires_at=NOW)  # not spent by the failed request


def test_existing_device_is_left_as_it_is(store: Store) -> None:
    store.upsert_device("d1", "boardA", now=NOW)
    store.set_device_status("d1", "retired", now=NOW)
    store.add_certificates([make_cert(5, device_id="d1")], devices=[("d1", "boardB")], now=NOW)
    dev = store.get_device("d1")
    assert dev is not None
    assert (dev.dtype, dev.status) == ("boardA", "retired")


def test_certificate_status_reads_what_ocsp_needs(store: Store) -> None:
    rec = make_cert(77, device_id="d7")
    store.add_certificates([rec])
    assert store.certificate_status(rec.issuer, 77) == ("valid", None, None)
    store.revoke_certificate(rec.issuer, 77, reason="keyCompromise", at=NOW, actor="admin")
    assert store.certificate_status(rec.issuer, 77) == ("revoked", NOW, "keyCompromise")
    assert store.certificate_status(rec.issuer, 78) is None
    assert store.certificate_status("no such issuer", 77) is None
