"""The console's fleet search and device trail on a real store (SQLite, and PostgreSQL when one
answers): a device id, a serial in any spelling, filters, and the audit records naming a device."""

from __future__ import annotations

import datetime as dt

from iotdlm.console.backend import LiveBackend
from iotdlm.store import AuditEntry, Store
from tests.fixtures_store import T0, make_cert

SERIAL = 0x67FD15F3A1


def _backend(store: Store) -> LiveBackend:
    store.add_certificates(
        [
            make_cert(SERIAL, device_id="dev-1"),
            make_cert(0x1234, device_id="dev-1", profile="factory"),
            make_cert(0x5678, device_id="dev-2", status="revoked"),
        ],
        devices=[("dev-1", "board-a"), ("dev-2", "board-a")],
        now=T0,
    )
    store.append_audit(
        [
            AuditEntry(T0, "revocation", "admin", f"operational:{SERIAL:x}", {"reason": "keyCompromise"}),
            AuditEntry(T0 + dt.timedelta(seconds=1), "revocation", "admin", "operational:5678", {}),
        ]
    )
    return LiveBackend(dep=None, store=store, bus=None, km=None, clock=None)  # type: ignore[arg-type]


def test_search_by_device_id_serial_in_any_spelling_and_filters(store: Store) -> None:
    backend = _backend(store)
    by_id = backend._fleet("dev-1", None, None, 50, 0)
    assert (by_id.matched, by_id.total) == ("device id", 2)
    assert set(by_id.devices) == {"dev-1"}
    for spelling in ("67:FD:15:F3:A1", "0x67fd15f3a1", "serial=67FD15F3A1", " 67fd15f3a1 "):
        found = backend._fleet(spelling, None, None, 50, 0)
        assert found.matched == "serial", spelling
        assert [c.serial for c in found.certificates] == [SERIAL], spelling
    assert backend._fleet("dev-1", "factory", None, 50, 0).total == 1
    assert backend._fleet("", None, "revoked", 50, 0).total == 1
    nothing = backend._fleet("no such thing", None, None, 50, 0)
    assert nothing.total == 0
    assert "not a serial" in nothing.matched


def test_a_device_page_has_its_certificates_and_its_audit_trail(store: Store) -> None:
    view = _backend(store)._device("dev-1")
    assert view.device is not None
    assert {c.serial for c in view.certificates} == {SERIAL, 0x1234}
    assert [r.subject for r in view.trail] == [f"operational:{SERIAL:x}"]  # not dev-2's record
