"""The device-facing trust-transfer routes (issue 13) over real HTTPS and a real NATS: cm relays,
km's handlers decide where the store is. One deployment plays SP1 (the device fetches its transfer
message, reports a fallback) and SP2 (the raURI: challenge and evidence); each refusal is audited."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import AsyncIterator

import pytest
from cryptography import x509

from iotdlm.errors import BadRequestError, NotAuthorizedError, NotFoundError, UnavailableError, UntrustedError
from iotdlm.km.transfer_device_handlers import keep_messages, publish_update
from iotdlm.pki.chain import certs_to_pem, der
from iotdlm.pki.keys import Algorithm, PrivateKey, generate_key, private_key_to_pem, sign_bytes
from iotdlm.pki.names import DEFAULT_ENTERPRISE_NUMBER, device_subject, device_uri
from iotdlm.store.transfer import TransferDeviceRecord, TransferRecord
from iotdlm.transfer import attestation
from iotdlm.transfer import status as st
from iotdlm.transfer.http_clients import TransferHttps
from tests.integration.test_cm import DTYPE, PASSPHRASE, Site, open_site

pytestmark = [pytest.mark.nats, pytest.mark.real_clock]

TID = "ab" * 32
IMAGE = b"firmware 4.2 for boardA"


@pytest.fixture
async def site(tmp_path) -> AsyncIterator[Site]:  # type: ignore[no-untyped-def]
    async with open_site(tmp_path) as s:
        yield s


def _https(site: Site, key: PrivateKey, cert: x509.Certificate) -> TransferHttps:
    return TransferHttps(
        anchors=[site.dep.ca_certificate("root")],
        client_cert_pem=certs_to_pem([cert]),
        client_key_pem=private_key_to_pem(key, None),
    )


def _transfer(site: Site, role: str, details: dict[str, dict[str, object]]) -> None:
    now = site.clock.now()
    site.store.save_transfer(TransferRecord(role, TID, "{}", now, now))
    site.store.put_transfer_devices(
        [TransferDeviceRecord(role, TID, d, st.PENDING, json.dumps(x), now) for d, x in details.items()]
    )


def _row(site: Site, role: str, device_id: str) -> TransferDeviceRecord:
    return site.store.get_transfer_devices(role, TID, [device_id])[device_id]


def _refusals(site: Site) -> list[tuple[str | None, str]]:
    return [(r.subject, str(r.data.get("message", ""))) for r in site.store.list_audit(kind="refused", limit=50)]


def _rogue(site: Site, device_id: str) -> tuple[PrivateKey, x509.Certificate]:
    """Signed by the deployment's factory CA (TLS accepts it) but never issued through km."""
    from iotdlm.pki.profiles import DEFAULT_PROFILES

    cas = site.dep.load_cas(PASSPHRASE)
    key = generate_key(Algorithm.P256)
    cert = cas["factory"].issue(
        DEFAULT_PROFILES["factory"], key.public_key(), device_subject(device_id, "T", DTYPE), now=site.clock.now(),
        serial=x509.random_serial_number(), uris=[device_uri(device_id, enterprise_number=DEFAULT_ENTERPRISE_NUMBER)],
    )  # fmt: skip
    return key, cert


async def test_sp1_device_fetches_its_message_and_reports_its_fallback(site: Site) -> None:
    k1, c1 = await site.factory("d1")
    await site.factory("d2")
    k3, c3 = await site.factory("d3")  # not part of the transfer
    _transfer(site, "sp1", {"d1": {"window": [0, 1]}, "d2": {"window": [0, 1]}})
    assert keep_messages(site.store, TID, {"d1": b"\xd2cwt-of-d1", "d2": b"\xd2cwt-of-d2"}, site.clock.now()) == 2
    base = site.https

    async with _https(site, k1, c1) as d1:
        assert await d1.fetch_message(base) == (TID, b"\xd2cwt-of-d1")
        assert _row(site, "sp1", "d1").status == st.FETCHED
        assert "fetched" in json.loads(_row(site, "sp1", "d1").detail)
        # a device asking for another device's message: refused (403), audited
        with pytest.raises(NotAuthorizedError, match="own message"):
            await d1.fetch_message(base, device="d2")
        asked = "device d1 asked for the transfer message of device 'd2': a device fetches its own message only"
        assert ("d1", asked) in _refusals(site)
        # a malformed report: 400 in words; nothing changes
        with pytest.raises(BadRequestError, match="reason"):
            await d1._ok("POST", f"{base}/transfer/fallback", "fallback", body=b'{"transfer": "' + TID.encode() + b'"}',
                         content_type="application/json")  # fmt: skip
        await d1.report(f"{base}/transfer/fallback", transfer_id=TID, device_id="d1", reason="CA2 unreachable\n(3x)")
    row = _row(site, "sp1", "d1")
    assert row.status == st.FAILED_FALLBACK
    assert json.loads(row.detail)["fallback"] == "CA2 unreachable (3x)"
    assert _row(site, "sp1", "d2").status == st.PENDING

    async with _https(site, k3, c3) as d3:
        with pytest.raises(NotFoundError, match="no transfer message waits for device d3"):
            await d3.fetch_message(base)
        # a device falling back from a transfer it is not part of: refused, audited
        with pytest.raises(NotAuthorizedError, match="not part of transfer"):
            await d3.report(f"{base}/transfer/fallback", transfer_id=TID, device_id="d3", reason="x")
    assert any(s == "d3" and "not part of transfer" in m for s, m in _refusals(site))

    # a wrong device certificate (our factory CA's signature, never issued through km): 403, audited
    rk, rc = _rogue(site, "d2")
    async with _https(site, rk, rc) as rogue:
        with pytest.raises(NotAuthorizedError, match="not registered"):
            await rogue.fetch_message(base)
    assert any("not registered" in m for _s, m in _refusals(site))
    assert _row(site, "sp1", "d2").status == st.PENDING

    # no client certificate at all: 401
    async with TransferHttps(anchors=[site.dep.ca_certificate("root")], client_cert_pem=None, client_key_pem=None) as a:
        with pytest.raises(UntrustedError, match="client certificate"):
            await a.fetch_message(base)


def _evidence(key: PrivateKey, cert: x509.Certificate, device_id: str, nonce: bytes, image: bytes) -> bytes:
    return attestation.make_evidence(
        lambda data: sign_bytes(key, data), key.public_key(), cert, nonce=nonce, device_id=device_id,
        measurement=attestation.measure(image),
    )  # fmt: skip


async def test_sp2_attestation_at_the_ra_uri(site: Site) -> None:
    k1, c1 = await site.factory("d1")
    k2, c2 = await site.factory("d2")
    ref = attestation.measure(IMAGE).hex()
    _transfer(site, "sp2", {d: {"factory": hashlib.sha256(der(c)).hexdigest(), "reference": ref}
                            for d, c in (("d1", c1), ("d2", c2))})  # fmt: skip
    ra = f"{site.https}/transfer/attestation"

    async with _https(site, k1, c1) as d1:
        nonce = await d1.challenge(ra, "d1")
        evidence = _evidence(k1, c1, "d1", nonce, IMAGE)
        verdict = await d1.submit(ra, evidence)
        assert verdict.ok, verdict
        assert _row(site, "sp2", "d1").status == st.ATTESTED
        # the same evidence again (its nonce spent): refused, audited; d1 stays as it was judged
        again = await d1.submit(ra, evidence)
        assert not again.ok
        assert "challenge" in again.reason
        # evidence in another device's name: refused, audited
        n2 = await d1.challenge(ra, "d1")
        other = await d1.submit(ra, _evidence(k1, c1, "d2", n2, IMAGE))
        assert not other.ok
        assert "in the name of device 'd2'" in other.reason
    refusals = _refusals(site)
    assert any(s == "d1" and "attestation refused" in m and "challenge" in m for s, m in refusals)
    assert any(s == "d1" and "in the name of device 'd2'" in m for s, m in refusals)

    # other firmware than SP1's reference: refused, audited, failed-fallback
    async with _https(site, k2, c2) as d2:
        nonce = await d2.challenge(ra, "d2")
        verdict = await d2.submit(ra, _evidence(k2, c2, "d2", nonce, b"tampered"))
    assert not verdict.ok
    assert "differs from the reference" in verdict.reason
    assert _row(site, "sp2", "d2").status == st.FAILED_FALLBACK
    assert any(s == "d2" and "differs from the reference" in m for s, m in _refusals(site))


async def test_sp2_update_server(site: Site, tmp_path) -> None:  # type: ignore[no-untyped-def]
    k1, c1 = await site.factory("d1")
    k3, c3 = await site.factory("d3")  # not part of the transfer
    _transfer(site, "sp2", {"d1": {"factory": hashlib.sha256(der(c1)).hexdigest()}})
    update = f"{site.https}/transfer/update"
    async with _https(site, k1, c1) as d1:
        # nothing published yet: 404 in words
        with pytest.raises(NotFoundError, match="no update is published"):
            await d1.fetch(update, "d1")
        site.km.transfer_device.updates_dir = tmp_path / "updates"
        publish_update(tmp_path / "updates", TID, IMAGE, "4.2")
        got = await d1.fetch(update, "d1")
        assert got.image == IMAGE
        assert dict(got.info) == {"transfer": TID, "version": "4.2", "sha256": hashlib.sha256(IMAGE).hexdigest()}
        assert _row(site, "sp2", "d1").status == st.PENDING  # fetched is not installed
        # a report for another transfer: refused, audited
        with pytest.raises(NotAuthorizedError, match="not its own"):
            await d1.report_updated(update, transfer_id="cd" * 32, version="4.2")
        await d1.report_updated(update, transfer_id=TID, version="4.2")
    row = _row(site, "sp2", "d1")
    assert row.status == st.UPDATED
    assert json.loads(row.detail)["update"] == "4.2"
    assert any(s == "d1" and "not its own" in m for s, m in _refusals(site))
    async with _https(site, k3, c3) as d3:
        with pytest.raises(NotFoundError, match="not being taken over here"):
            await d3.fetch(update, "d3")


async def test_sp1_hears_of_refused_messages_audits_and_limits_them(site: Site) -> None:
    from iotdlm.cm.transfer_routes import REFUSALS_PER_WINDOW

    k1, c1 = await site.factory("d1")
    k3, c3 = await site.factory("d3")  # not part of the transfer
    _transfer(site, "sp1", {"d1": {"window": [0, 1]}})
    kept = b"\xd2cwt-of-d1"
    keep_messages(site.store, TID, {"d1": kept}, site.clock.now())
    base = site.https

    def reports() -> list[tuple[str | None, dict[str, object]]]:
        return [(r.subject, dict(r.data)) for r in site.store.list_audit(kind="device_refusal", limit=50)]

    async with _https(site, k1, c1) as d1:
        # the message SP1 kept, refused as expired: the report names it by hash
        await d1.report_refusal(base, reason="expired", detail="the message expired at 2030-01-01",
                                message=hashlib.sha256(kept).hexdigest())  # fmt: skip
        # an unknown reason: 400 in words, nothing audited
        with pytest.raises(BadRequestError, match="one of replayed, expired"):
            await d1.report_refusal(base, reason="bored", detail="x", message="")
        assert len(reports()) == 1
        await d1.report_refusal(base, reason="altered", detail="the signature does not verify", message="")
        for _ in range(REFUSALS_PER_WINDOW - 2):
            await d1.report_refusal(base, reason="replayed", detail="cti seen", message="")
        # over the per-device limit: 429 (retry later), not audited
        with pytest.raises(UnavailableError, match="report again later"):
            await d1.report_refusal(base, reason="replayed", detail="once too often", message="")
    got = reports()
    assert len(got) == REFUSALS_PER_WINDOW
    [(subject, first)] = [(s, d) for s, d in got if d["reason"] == "expired"]
    assert subject == "d1"
    assert first == {"reason": "expired", "detail": "the message expired at 2030-01-01", "transfer": TID,
                     "message": hashlib.sha256(kept).hexdigest(), "ours": True}  # fmt: skip
    row = _row(site, "sp1", "d1")
    assert row.status == st.PENDING  # a refused message moves nothing
    detail = json.loads(row.detail)
    assert detail["refused"] == REFUSALS_PER_WINDOW
    assert st.last_refusal(row.detail) == "replayed: cti seen"

    # a device in no transfer: audited all the same
    async with _https(site, k3, c3) as d3:
        await d3.report_refusal(base, reason="wrong-signer", detail="not a transfer identity", message="")
    assert any(s == "d3" and d["reason"] == "wrong-signer" and d["transfer"] is None for s, d in reports())
    # a certificate km does not know: 403, audited as a refusal of the report itself
    rk, rc = _rogue(site, "d1")
    async with _https(site, rk, rc) as rogue:
        with pytest.raises(NotAuthorizedError, match="not registered"):
            await rogue.report_refusal(base, reason="expired", detail="x", message="")
    assert len([1 for s, _d in reports() if s == "d1"]) == REFUSALS_PER_WINDOW


async def test_a_challenge_from_one_km_worker_is_answered_at_another_after_a_restart(site: Site) -> None:
    """The challenge lives in the store: km worker 1 issues it and stops; worker 2 (its own store
    connection, started afresh on the same database) judges the evidence. Single use, expiring."""
    from iotdlm.km import KmService
    from iotdlm.runtime import build_km, km_identity, open_store

    k1, c1 = await site.factory("d1")
    k2, c2 = await site.factory("d2")
    ref = attestation.measure(IMAGE).hex()
    _transfer(site, "sp2", {d: {"factory": hashlib.sha256(der(c)).hexdigest(), "reference": ref}
                            for d, c in (("d1", c1), ("d2", c2))})  # fmt: skip
    ra = f"{site.https}/transfer/attestation"
    async with _https(site, k1, c1) as d1, _https(site, k2, c2) as d2:
        nonce = await d1.challenge(ra, "d1")
        n2 = await d2.challenge(ra, "d2")
        await site.km.stop()  # worker 1 is gone (a restart, or another worker takes the request)
        store2 = open_store(site.dep)
        bus2 = await site.nats.connect("km")
        site.buses.append(bus2)
        worker2 = KmService(build_km(site.dep, store2, site.clock, passphrase=PASSPHRASE), bus2,
                            identity=km_identity(site.dep))  # fmt: skip
        await worker2.start()
        try:
            evidence = _evidence(k1, c1, "d1", nonce, IMAGE)
            verdict = await d1.submit(ra, evidence)
            assert verdict.ok, verdict
            assert _row(site, "sp2", "d1").status == st.ATTESTED
            # single use: the same answer again is refused, at any worker
            again = await d1.submit(ra, evidence)
            assert not again.ok
            assert "no challenge is outstanding" in again.reason
            # expiry: d2 answers after its challenge's time ran out
            site.clock.offset += attestation.DEFAULT_TTL + dt.timedelta(seconds=1)
            late = await d2.submit(ra, _evidence(k2, c2, "d2", n2, IMAGE))
            assert not late.ok
            assert "expired" in late.reason
            assert site.store.count_challenges("d2") == 0  # spent all the same
        finally:
            site.clock.offset = dt.timedelta()
            await worker2.stop()
            store2.close()
