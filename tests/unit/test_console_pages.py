"""The console's pages without a browser (aiohttp's test client, a fake backend): who gets in, what
a form needs (the CSRF token, our origin, the confirmation), what each page says, and that no input
makes a traceback (Hypothesis on the query parameters the pages parse)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotdlm.clock import FixedClock
from iotdlm.console.app import make_app
from iotdlm.console.backend import CaView, DeviceView, FleetPage, PmView, SoftwareView, TransferView, VerifyView
from iotdlm.console.tls import NotAdminError, check_admin
from iotdlm.errors import BadRequestError, UnavailableError
from iotdlm.km.audit import AuditReport
from iotdlm.store.records import CertRecord, DeviceRecord, ProvisioningRecord, fingerprint_of
from iotdlm.wire import km as msg
from iotdlm.wire import modes as m
from iotdlm.wire import pm as wire_pm
from tests.helpers import NOW, make_pki

PKI = make_pki()
ADMIN = PKI.module("admin")
KM = PKI.module("km")
LEAF = PKI.module("pm", "board-a").cert  # any certificate will do as a device's


def _cert(device_id: str, status: str = "valid") -> CertRecord:
    der = LEAF.public_bytes(Encoding.DER)
    return CertRecord(
        serial=LEAF.serial_number, issuer="operational", subject="CN=x", device_id=device_id, profile="operational",
        not_before=NOW, not_after=LEAF.not_valid_after_utc, status=status, der=der, fingerprint=fingerprint_of(der),
        requested_by="pm", created_at=NOW,
    )  # fmt: skip


def _status(mode: str = "certificate-management") -> m.StatusReply:
    return m.StatusReply(
        mode=mode, since="2026-11-21T12:00:00Z", by="ops@host", with_sm=False, supervisor_pid=1,
        nats_url="nats://127.0.0.1:1", switching=None, services=[],
    )  # fmt: skip


@dataclasses.dataclass
class FakeBackend:
    registered: bool = True
    calls: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)
    fail: Exception | None = None
    revoked_admin: bool = False
    transfer_views: list[TransferView] = dataclasses.field(default_factory=list)
    held: SoftwareView = dataclasses.field(
        default_factory=lambda: SoftwareView(None, "sm did not answer (no responders)")
    )

    async def admin_revoked(self, fingerprint: str) -> bool:
        return self.revoked_admin

    async def fleet(self, query: str, profile: str | None, status: str | None, limit: int, offset: int) -> FleetPage:
        self.calls.append(("fleet", query, profile, status, offset))
        return FleetPage([_cert("dev-1")], 1, {}, "device id")

    async def device(self, device_id: str) -> DeviceView:
        if self.fail is not None:
            raise self.fail
        rec = DeviceRecord(device_id, "board-a", "active", NOW, NOW) if self.registered else None
        return DeviceView(rec, [_cert(device_id)] if device_id.startswith("dev") else [], [])

    async def ocsp_status(self, cert: CertRecord) -> str:
        return "good"

    async def revoke(self, device_id: str, reason: str | None, *, decommission: bool) -> list[msg.CertificateInfo]:
        self.calls.append(("revoke", device_id, reason, decommission))
        return []

    async def revoke_certificate(self, cert: CertRecord, reason: str | None) -> list[msg.CertificateInfo]:
        self.calls.append(("revoke_certificate", cert.serial, reason))
        return []

    async def mode_status(self) -> m.StatusReply:
        return _status()

    async def switch_mode(self, mode: str, by: str) -> m.SetReply:
        self.calls.append(("switch", mode, by))
        return m.SetReply(from_mode="certificate-management", to=mode, with_sm=False, since="x", stopped=["cm"])

    async def audit_page(self, limit: int, offset: int) -> tuple[list[Any], int]:
        return [], 0

    async def audit_verify(self) -> VerifyView:
        return VerifyView(AuditReport(records=3, problems=["record 2: hash does not match"], first_bad_seq=2), 1)

    async def cas(self) -> list[CaView]:
        return [CaView("root", PKI.root, [])]

    async def metrics(self) -> str:
        raise UnavailableError("the supervisor's /metrics did not answer")

    async def provisioning(self) -> list[PmView]:
        alarm = wire_pm.Alarm(
            dtype="board-a", check="sig_sm", code="untrusted", message="sig_sm does not verify",
            raised_at="2026-11-21T12:00:00Z", raised_by="pm-board-a",
        )  # fmt: skip
        failed = ProvisioningRecord(
            device_id="board-a-00002", dtype="board-a", status="failed", operator="line 1", started_at=NOW,
            updated_at=NOW, failed_step="software", message="image hash differs",
        )  # fmt: skip
        return [PmView("board-a", alarm, {"complete": 3, "failed": 1}, [failed])]

    async def clear_alarm(self, dtype: str, operator: str) -> None:
        self.calls.append(("clear_alarm", dtype, operator))

    async def transfers(self) -> list[TransferView]:
        return self.transfer_views

    async def software(self) -> SoftwareView:
        return self.held


def _peer(request: web.Request) -> bytes | None:
    who = request.headers.get("X-Test-Peer")
    cert = {"admin": ADMIN.cert, "km": KM.cert}.get(who or "")
    return cert.public_bytes(Encoding.DER) if cert is not None else None


@pytest.fixture
async def env() -> AsyncIterator[tuple[TestClient[web.Request, web.Application], FakeBackend]]:
    backend = FakeBackend()
    app = make_app(backend, ADMIN.cert, FixedClock(NOW), peer=_peer)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client, backend


AS_ADMIN = {"X-Test-Peer": "admin"}
Env = tuple[TestClient[web.Request, web.Application], FakeBackend]


async def _csrf(client: TestClient[web.Request, web.Application], path: str) -> str:
    page = await (await client.get(path, headers=AS_ADMIN)).text()
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found is not None, page
    return found.group(1)


# --- who gets in ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("who", "says"),
    [(None, "no client certificate"), ("km", "not the deployment&#39;s admin certificate")],
    ids=["no-certificate", "a-module-certificate"],
)
async def test_only_the_admin_certificate_logs_in(env: Env, who: str | None, says: str) -> None:
    client, backend = env
    resp = await client.get("/fleet", headers={"X-Test-Peer": who} if who else {})
    assert resp.status == 403
    body = await resp.text()
    assert "Not logged in" in body
    assert says in body
    assert backend.calls == []  # nothing was asked of the deployment


async def test_a_revoked_admin_certificate_is_refused(env: Env) -> None:
    client, backend = env
    backend.revoked_admin = True
    resp = await client.get("/fleet", headers=AS_ADMIN)
    assert resp.status == 403
    assert "revoked" in await resp.text()


def test_check_admin_refuses_an_expired_admin_certificate() -> None:
    der = ADMIN.cert.public_bytes(Encoding.DER)
    check_admin(der, ADMIN.cert, NOW)
    with pytest.raises(NotAdminError, match="not valid now"):
        check_admin(der, ADMIN.cert, ADMIN.cert.not_valid_after_utc.replace(year=2100))


async def test_every_page_carries_the_security_headers(env: Env) -> None:
    client, _ = env
    pages = ("/fleet", "/devices/dev-1", "/mode", "/audit", "/audit/verify", "/cas", "/health", "/provisioning",
             "/transfers", "/provisioning/clear-alarm?dtype=board-a")  # fmt: skip
    for path in pages:
        resp = await client.get(path, headers=AS_ADMIN)
        assert resp.status == 200, (path, await resp.text())
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert "<script" not in await resp.text()  # readable without JavaScript: there is none


# --- forms ------------------------------------------------------------------------------------------
async def test_a_revocation_needs_the_token_our_origin_and_the_confirmation(env: Env) -> None:
    client, backend = env
    token = await _csrf(client, "/devices/dev-1/revoke?reason=keyCompromise")
    form = {"csrf": token, "action": "revoke", "reason": "keyCompromise", "confirm": "yes"}
    refused = [
        ({**form, "csrf": "0" * 64}, {}, 403),
        ({k: v for k, v in form.items() if k != "csrf"}, {}, 403),
        (form, {"Origin": "https://evil.example"}, 403),
        ({k: v for k, v in form.items() if k != "confirm"}, {}, 400),
        ({**form, "reason": "certificateHold"}, {}, 400),
        ({**form, "action": "explode"}, {}, 400),
    ]
    for data, headers, status in refused:
        resp = await client.post("/devices/dev-1/revoke", data=data, headers={**AS_ADMIN, **headers})
        assert resp.status == status, (data, headers, await resp.text())
    assert [c for c in backend.calls if c[0].startswith("revoke")] == []
    resp = await client.post("/devices/dev-1/revoke", data=form, headers=AS_ADMIN, allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"].startswith("/devices/dev-1?done=")
    assert backend.calls[-1] == ("revoke", "dev-1", "keyCompromise", False)


async def test_a_certificate_without_a_device_record_is_revoked_by_serial(env: Env) -> None:
    client, backend = env
    backend.registered = False
    token = await _csrf(client, "/devices/dev-9/revoke?reason=superseded")
    form = {"csrf": token, "action": "revoke", "reason": "superseded", "confirm": "yes"}
    resp = await client.post("/devices/dev-9/revoke", data=form, headers=AS_ADMIN, allow_redirects=False)
    assert resp.status == 303
    assert backend.calls[-1] == ("revoke_certificate", LEAF.serial_number, "superseded")


async def test_an_unknown_reason_lists_the_accepted_ones(env: Env) -> None:
    client, _ = env
    resp = await client.get("/devices/dev-1/revoke?reason=because", headers=AS_ADMIN)
    assert resp.status == 400
    assert "keyCompromise" in await resp.text()


async def test_a_mode_switch_is_confirmed_and_names_the_console_operator(env: Env) -> None:
    client, backend = env
    page = await (await client.get("/mode/switch?to=provisioning-certificate", headers=AS_ADMIN)).text()
    assert "Switch to <code>provisioning-certificate</code>?" in page
    assert "km, pm" in page
    token = await _csrf(client, "/mode/switch?to=provisioning-certificate")
    form = {"csrf": token, "to": "provisioning-certificate"}
    assert (await client.post("/mode/switch", data=form, headers=AS_ADMIN)).status == 400  # not confirmed
    resp = await client.post("/mode/switch", data={**form, "confirm": "yes"}, headers=AS_ADMIN, allow_redirects=False)
    assert resp.status == 303
    assert "stopped+cm" in resp.headers["Location"]
    assert backend.calls[-1][:2] == ("switch", "provisioning-certificate")
    assert backend.calls[-1][2].startswith("console:admin@")
    bad = await client.get("/mode/switch?to=party", headers=AS_ADMIN)
    assert bad.status == 400
    assert "certificate-management" in await bad.text()


async def test_a_pm_alarm_is_shown_and_cleared_after_a_confirmation(env: Env) -> None:
    client, backend = env
    page = await (await client.get("/provisioning", headers=AS_ADMIN)).text()
    assert "HALTED" in page
    assert "sig_sm does not verify" in page
    assert "image hash differs" in page
    token = await _csrf(client, "/provisioning/clear-alarm?dtype=board-a")
    form = {"csrf": token, "dtype": "board-a"}
    assert (await client.post("/provisioning/clear-alarm", data=form, headers=AS_ADMIN)).status == 400
    assert (await client.post("/provisioning/clear-alarm", data={**form, "confirm": "yes"})).status == 403
    resp = await client.post(
        "/provisioning/clear-alarm", data={**form, "confirm": "yes"}, headers=AS_ADMIN, allow_redirects=False
    )
    assert resp.status == 303
    assert backend.calls[-1][:2] == ("clear_alarm", "board-a")
    assert backend.calls[-1][2].startswith("console:admin@")


# --- what pages say ---------------------------------------------------------------------------------
async def test_a_damaged_audit_log_says_where_it_breaks(env: Env) -> None:
    client, _ = env
    body = await (await client.get("/audit/verify", headers=AS_ADMIN)).text()
    assert "Audit log damaged: 1 problem(s), first at record 2." in body
    assert "record 2: hash does not match" in body


@pytest.mark.parametrize(
    ("fail", "status", "says"),
    [
        (UnavailableError("no responder on iotdlm.v1.km.get"), 503, "Is the deployment up"),
        (BadRequestError("device id too long"), 400, "device id too long"),
        (RuntimeError("secret internals"), 500, "something unexpected failed"),
    ],
    ids=["unavailable", "refused", "unexpected"],
)
async def test_failures_are_pages_in_words_never_tracebacks(env: Env, fail: Exception, status: int, says: str) -> None:
    client, backend = env
    backend.fail = fail
    resp = await client.get("/devices/dev-1", headers=AS_ADMIN)
    body = await resp.text()
    assert resp.status == status
    assert says in body
    assert "Traceback" not in body
    assert "secret internals" not in body


async def test_device_ids_are_escaped(env: Env) -> None:
    client, _ = env
    body = await (await client.get("/devices/dev-<img src=x onerror=alert(1)>", headers=AS_ADMIN)).text()
    assert "<img" not in body
    assert "&lt;img src=x onerror=alert(1)&gt;" in body
    missing = await client.get("/nowhere", headers=AS_ADMIN)
    assert missing.status == 404
    assert "Not Found" in await missing.text()
    assert "Back to the fleet" in await missing.text()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    q=st.text(max_size=300),
    page=st.text(max_size=12),
    profile=st.sampled_from(["", "operational", "nope", "<b>"]),
    status=st.text(max_size=12),
)
async def test_any_fleet_query_is_a_page_or_a_refusal(env: Env, q: str, page: str, profile: str, status: str) -> None:
    client, _ = env
    resp = await client.get("/fleet", params={"q": q, "page": page, "profile": profile, "status": status},
                            headers=AS_ADMIN)  # fmt: skip
    assert resp.status in (200, 400), await resp.text()
