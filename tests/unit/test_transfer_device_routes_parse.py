"""cm's parsers of the device-facing transfer routes (issue 13): named cases and Hypothesis."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from iotdlm.cm.transfer_routes import parse_device_query, parse_fallback, parse_update_report
from iotdlm.errors import BadRequestError

TID = "0f" * 32


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "must be JSON"),
        (b"\xff\xfe", "must be JSON"),
        (b"[]", "exactly"),
        (b'{"transfer": "ab"}', "exactly"),
        (b'{"transfer": "ab", "reason": "x", "device": "d2"}', "exactly"),
        (b'{"transfer": "AB", "reason": "x"}', "hex id"),
        (b'{"transfer": "", "reason": "x"}', "hex id"),
        (json.dumps({"transfer": "a" * 65, "reason": "x"}).encode(), "hex id"),
        (b'{"transfer": 7, "reason": "x"}', "hex id"),
        (json.dumps({"transfer": TID, "reason": " \n "}).encode(), "why"),
        (json.dumps({"transfer": TID, "reason": ["x"]}).encode(), "why"),
    ],
    ids=[
        "empty",
        "not-utf8",
        "list",
        "no-reason",
        "extra-field",
        "upper-hex",
        "empty-id",
        "long-id",
        "int-id",
        "blank-reason",
        "list-reason",
    ],
)
def test_bad_fallback_reports_are_refused_in_words(body: bytes, match: str) -> None:
    with pytest.raises(BadRequestError, match=match):
        parse_fallback(body)


def test_a_fallback_report_is_flattened_and_bounded() -> None:
    tid, reason = parse_fallback(json.dumps({"transfer": TID, "reason": "CA2\r\nunreachable  " + "x" * 900}).encode())
    assert tid == TID
    assert reason.startswith("CA2 unreachable x")
    assert len(reason) == 500


@given(hs.binary(max_size=300))
def test_any_fallback_body_parses_or_is_refused(body: bytes) -> None:
    try:
        tid, reason = parse_fallback(body)
    except BadRequestError:
        return
    assert 0 < len(tid) <= 64
    assert 0 < len(reason) <= 500
    assert "\n" not in reason


@given(hs.dictionaries(hs.text(max_size=10), hs.text(max_size=300), max_size=3))
def test_any_message_query_parses_or_is_refused(query: dict[str, str]) -> None:
    try:
        device = parse_device_query(query)
    except BadRequestError:
        assert (
            set(query) - {"device"}
            or len(query.get("device", "")) > 255
            or any(ord(c) < 0x20 or ord(c) == 0x7F for c in query.get("device", ""))
        )
        return
    assert device == query.get("device", "")


def test_message_query_cases() -> None:
    assert parse_device_query({}) == ""
    assert parse_device_query({"device": "d1"}) == "d1"
    with pytest.raises(BadRequestError, match="only device="):
        parse_device_query({"transfer": "x"})
    with pytest.raises(BadRequestError, match="not a device id"):
        parse_device_query({"device": "d1\n"})


@given(hs.binary(max_size=300))
def test_any_update_report_parses_or_is_refused(body: bytes) -> None:
    try:
        tid, version = parse_update_report(body)
    except BadRequestError:
        return
    assert 0 < len(tid) <= 64
    assert 0 < len(version) <= 64


@pytest.mark.parametrize(
    "body",
    [b"{}", b'{"transfer": "ab"}', b'{"transfer": "ab", "version": ""}', b'{"transfer": "zz", "version": "1"}',
     json.dumps({"transfer": "ab", "version": "v" * 65}).encode(), b"null"],
    ids=["empty", "no-version", "blank-version", "not-hex", "long-version", "null"],
)  # fmt: skip
def test_bad_update_reports_are_refused(body: bytes) -> None:
    with pytest.raises(BadRequestError):
        parse_update_report(body)


def test_an_update_report() -> None:
    assert parse_update_report(json.dumps({"transfer": TID, "version": " 4.2\n"}).encode()) == (TID, "4.2")


def test_the_https_client_fits_the_agents_seams() -> None:
    """TransferHttps is what a device agent plugs in for attestation, updates and fallback."""
    import inspect

    from iotdlm.transfer.agent import AttestationClient, FallbackClient, UpdateClient
    from iotdlm.transfer.http_clients import TransferHttps

    for seam, names in ((AttestationClient, ("challenge", "submit")), (UpdateClient, ("fetch",)),
                        (FallbackClient, ("report",))):  # fmt: skip
        for name in names:
            ours, theirs = inspect.signature(getattr(TransferHttps, name)), inspect.signature(getattr(seam, name))
            assert list(ours.parameters) == list(theirs.parameters), (seam.__name__, name)
            assert [p.kind for p in ours.parameters.values()] == [p.kind for p in theirs.parameters.values()]
            assert inspect.iscoroutinefunction(getattr(TransferHttps, name))


def test_the_devices_https_clients_fit_the_seams_and_report_updated() -> None:
    """DeviceHttps (what device run / fleet run plug in) has the seams' signatures, and the agent
    sees it as an update client that reports the installed version."""
    import inspect

    from iotdlm.transfer.agent import AttestationClient, FallbackClient, UpdateClient, UpdateReporter
    from iotdlm.transfer.http_clients import DeviceHttps, TransferHttps

    for seam, names in ((AttestationClient, ("challenge", "submit")), (UpdateClient, ("fetch",)),
                        (FallbackClient, ("report",)), (UpdateReporter, ("report_updated",))):  # fmt: skip
        for name in names:
            ours, theirs = inspect.signature(getattr(DeviceHttps, name)), inspect.signature(getattr(seam, name))
            assert list(ours.parameters) == list(theirs.parameters), (seam.__name__, name)
            assert [p.kind for p in ours.parameters.values()] == [p.kind for p in theirs.parameters.values()]
    assert issubclass(DeviceHttps, UpdateReporter)
    assert issubclass(TransferHttps, UpdateReporter)


async def test_a_device_without_truststore_or_certificate_is_told_so(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from iotdlm.device.simulated import SimulatedDevice
    from iotdlm.errors import NotFoundError
    from iotdlm.transfer.http_clients import DeviceHttps, DeviceMessages

    dev = SimulatedDevice.manufacture(tmp_path / "d", "d-1", "sensor")
    with pytest.raises(NotFoundError, match="empty truststore: it cannot authenticate cm"):
        await DeviceMessages(timeout=1.0).fetch(dev, "https://127.0.0.1:1")
    dev.write_truststore([_some_ca()])
    with pytest.raises(NotFoundError, match="has no factory certificate"):
        await DeviceHttps(dev, timeout=1.0).challenge("https://127.0.0.1:1/transfer/attestation", "d-1")
    with pytest.raises(NotFoundError, match="has no factory certificate"):
        await DeviceHttps(dev, timeout=1.0).report("https://127.0.0.1:1/transfer/fallback", transfer_id=TID,
                                                   device_id="d-1", reason="x")  # fmt: skip


def _some_ca():  # type: ignore[no-untyped-def]
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a root")])
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
