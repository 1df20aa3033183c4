"""The trust-transfer messages against their CDDL (src/iotdlm/transfer/messages/transfer.cddl),
checked by a real CDDL validator (zcbor; pycddl mishandles optional trailing array items): every
message iotdlm produces validates, and a message that violates the CDDL is caught."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import cbor2
import pytest
import zcbor
import zcbor.zcbor.zcbor as zcbor_impl
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm.pki.chain import der
from iotdlm.transfer import cose
from iotdlm.transfer import messages as m
from tests.helpers import NOW
from tests.unit.test_transfer_device import device_message
from tests.unit.test_transfer_messages import DEVICES, SEEDS, P, claims, header, make_export, make_tm

CDDL = resources.files("iotdlm.transfer.messages").joinpath("transfer.cddl").read_text()


def _keep_time_tags(obj: Any) -> Any:
    """cbor2 turns tag 1 into a datetime; zcbor must see the tag to check ``Time = #6.1(uint)``."""
    if isinstance(obj, dt.datetime):
        return cbor2.CBORTag(1, int(obj.timestamp()))
    if isinstance(obj, list):
        return [_keep_time_tags(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _keep_time_tags(v) for k, v in obj.items()}
    if isinstance(obj, cbor2.CBORTag):
        return cbor2.CBORTag(obj.tag, _keep_time_tags(obj.value))
    return obj


@pytest.fixture(scope="module")
def schema(monkeypatch_module: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch_module.setattr(zcbor_impl, "loads", lambda b: _keep_time_tags(cbor2.loads(b)))
    prelude = (Path(zcbor.__file__).parent / "zcbor" / "prelude.cddl").read_text()
    return dict(zcbor.DataTranslator.from_cddl(prelude + "\n" + CDDL, 100).my_types)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Any:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _export_payload(token: bytes) -> bytes:
    return base64.urlsafe_b64decode(token.split(b".")[1] + b"=" * (-len(token.split(b".")[1]) % 4))


def _bare_export() -> bytes:
    entries = tuple(
        m.DeviceUpdateInfo(c.tbs_certificate_bytes, NOW, NOW + dt.timedelta(days=1), m.VersionInfo(0, ""))
        for _k, c in DEVICES.values()
    )
    export = m.UpdateInfoExport(entries, tuple(der(c) for _k, c in DEVICES.values()), "sp2", NOW)
    return m.sign_update_info(export, P.sp1.key, P.sp1.certificate)


VALID: dict[str, tuple[str, Callable[[], bytes]]] = {
    "TransferMessage": ("TransferMessageCwt", make_tm),
    "TransferMessage, no RA, no anchors, fallback left to SP1": (
        "TransferMessageCwt",
        lambda: m.sign_transfer_message(
            m.TransferMessage(header(), b"r" * 32, claims(ra_uri=None, trust_anchors=(), fallback_uri="")),
            P.sp2.signer(with_chain=False),
        ),
    ),
    "per-device message (x5t)": ("DeviceTransferCwt", device_message),
    "per-device message (x5chain)": ("DeviceTransferCwt", lambda: device_message(signer=P.sp1.signer(with_chain=True))),
    "per-device message, no anchors": ("DeviceTransferCwt", lambda: device_message(trust_anchors=(), ra_uri=None)),
    "confirmation": ("ConfirmationCwt", lambda: SEEDS["confirmation"]),
    "UpdateInfoList payload (raReference)": ("UpdateInfoExport", lambda: _export_payload(make_export())),
    "UpdateInfoList payload (no raReference)": ("UpdateInfoExport", lambda: _export_payload(_bare_export())),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_what_iotdlm_produces_validates(schema: dict[str, Any], name: str) -> None:
    rule, make = VALID[name]
    assert schema[rule].validate_str(make())


def _rewrap(token: bytes, change: Callable[[dict[int, Any], dict[int, Any]], None]) -> bytes:
    """A CWT whose protected header and claims ``change`` edits (the signature is not redone: the
    CDDL speaks of structure, and the codecs refuse the signature anyway)."""
    msg = cose.parse_sign1(token, what="t", max_bytes=1 << 16)
    protected = dict(msg.protected)
    claims_ = cbor2.loads(msg.payload)
    change(protected, claims_)
    body = [cose.dumps(protected), {}, cose.dumps(claims_), msg.signature]
    return cose.dumps(cbor2.CBORTag(cose.TAG_SIGN1, body))


def _set(i: int, value: Any) -> Callable[[dict[int, Any], dict[int, Any]], None]:
    return lambda _p, c: c[m.TRANSFER].__setitem__(i, value)


VIOLATIONS: dict[str, tuple[str, Callable[[], bytes]]] = {
    "typ a media type string": (
        "DeviceTransferCwt",
        lambda: _rewrap(device_message(), lambda p, _c: p.__setitem__(cose.TYP, "application/cwt")),
    ),
    "no aud": ("DeviceTransferCwt", lambda: _rewrap(device_message(), lambda _p, c: c.pop(m.AUD))),
    "cti of 8 bytes": ("TransferMessageCwt", lambda: _rewrap(make_tm(), lambda _p, c: c.__setitem__(m.CTI, b"c" * 8))),
    "trust anchor by SHA-256/64": (
        "DeviceTransferCwt",
        lambda: _rewrap(device_message(), _set(7, [[-15, b"h" * 8]])),
    ),
    "a ninth item in Listing 2's array": (
        "DeviceTransferCwt",
        lambda: _rewrap(device_message(), lambda _p, c: c[m.TRANSFER].append(b"extra")),
    ),
    "updateURI as the old [bstr, bool] pair": (
        "TransferMessageCwt",
        lambda: _rewrap(make_tm(), _set(3, [b"https://u.example", True])),
    ),
    "time untagged": ("TransferMessageCwt", lambda: _rewrap(make_tm(), _set(0, 1_700_000_000))),
    "transferRef of 32 bytes": (
        "ConfirmationCwt",
        lambda: _rewrap(SEEDS["confirmation"], lambda _p, c: c.__setitem__(m.TRANSFER_REF, b"r" * 32)),
    ),
    "TransferMessage without x5t": (
        "TransferMessageCwt",
        lambda: _rewrap(make_tm(), lambda p, _c: p.pop(cose.X5T)),
    ),
    "DeviceUpdateInfo raReference of 20 bytes": (
        "UpdateInfoExport",
        lambda: cose.dumps(
            [
                [[b"tbs", cbor2.CBORTag(1, 1), cbor2.CBORTag(1, 2), [1, "u"], b"x" * 20]],
                b"cert",
                "sp2",
                cbor2.CBORTag(1, 3),
            ]
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(VIOLATIONS))
def test_a_message_violating_the_cddl_is_caught(schema: dict[str, Any], name: str) -> None:
    rule, make = VIOLATIONS[name]
    with pytest.raises(zcbor.CddlValidationError):
        schema[rule].validate_str(make())


_uri = st.from_regex(r"https://[a-z0-9.-]{1,40}(/[a-z0-9._-]{0,30}){0,3}", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(
    ra=st.none() | _uri,
    update=st.just("") | _uri,
    enroll=_uri,
    fallback=_uri,
    anchors=st.lists(st.binary(min_size=32, max_size=32), max_size=m.MAX_ANCHORS),
    window=st.integers(min_value=1, max_value=10**7),
    aud=st.text(min_size=1, max_size=64),
)
def test_every_device_message_our_encoder_makes_validates(
    schema: dict[str, Any], ra: str | None, update: str, enroll: str, fallback: str, anchors: list[bytes],
    window: int, aud: str,
) -> None:  # fmt: skip
    c = dataclasses.replace(
        claims(),
        ra_uri=ra,
        update_uri=update,
        update_first=bool(update),
        enroll_uri=enroll,
        fallback_uri=fallback,
        trust_anchors=tuple(anchors),
        reset_not_after=NOW + dt.timedelta(seconds=window),
    )
    hdr = m.CwtHeader(None, aud, b"c" * 16, NOW, NOW, NOW + dt.timedelta(days=1))
    token = m.sign_device_message(m.TransferMessage(hdr, b"r" * 16, c), P.sp1.signer(with_chain=False))
    assert schema["DeviceTransferCwt"].validate_str(token)
    # and the codec reads back what the CDDL accepts
    payload = cose.parse_sign1(token, what="t", max_bytes=1 << 16).payload
    assert m.TransferMessage.from_payload(payload, what="t").claims == c
