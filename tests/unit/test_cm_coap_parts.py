"""cm's CoAP door, the parts with no network: cm's EDHOC policy (credentials by value only,
sessions bounded, no EDHOC while the mode forbids enrolling), refusals as CoAP codes, and the
device's reading of cm's refusals (Hypothesis: any answer is an IotdlmError, never a crash)."""

from __future__ import annotations

from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap import edhoc
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm.cm.coap import DoorCredentials, EdhocPeer, OscoreRequiredError, coap_error, load_or_make_key
from iotdlm.device.coap_client import CoapUnavailableError, _error_for
from iotdlm.errors import (
    BadRequestError,
    IotdlmError,
    ModeError,
    NotAuthorizedError,
    RejectedError,
    TooLargeError,
    UnavailableError,
)
from iotdlm.wire import coap_est as wire


def _identity() -> edhoc.EdhocCredentials:
    key = ec.generate_private_key(ec.SECP256R1())
    d = key.private_numbers().private_value.to_bytes(32, "big")
    return edhoc.EdhocCredentials(
        suite=2,
        method=3,
        own_cred_style="by-key-id",
        own_cred={14: wire.ccs_for(key.public_key(), "cm", b"\x01")},
        private_key={1: 2, -1: 1, -4: d},
    )


def test_edhoc_sessions_are_bounded_oldest_first() -> None:
    creds = DoorCredentials(_identity(), lambda: True, max_sessions=3)
    for i in range(5):
        creds[f":s{i}"] = object()
    assert sorted(k for k in creds if k.startswith(":")) == [":s2", ":s3", ":s4"]


def test_identity_only_while_the_mode_admits() -> None:
    admitted = [True]
    creds = DoorCredentials(_identity(), lambda: admitted[0], max_sessions=3)
    assert creds.get("coap://any.example/*") is not None
    admitted[0] = False
    assert creds.get("coap://any.example/*") is None


def test_peer_credential_by_value_only() -> None:
    creds = DoorCredentials(_identity(), lambda: True, max_sessions=3)
    key = ec.generate_private_key(ec.SECP256R1())
    ccs = wire.ccs_for(key.public_key(), "dev-1", b"\x02")
    cred, [peer] = creds.find_edhoc_by_id_cred_peer(cbor2.dumps({14: ccs}))
    assert cred == wire.ccs_bytes(ccs)
    assert isinstance(peer, EdhocPeer)
    assert wire.same_key(key.public_key(), peer.public_key)
    assert peer.subject == "dev-1"
    with pytest.raises(KeyError):
        creds.find_edhoc_by_id_cred_peer(cbor2.dumps({4: b"\x02"}))  # by kid
    with pytest.raises(KeyError):
        creds.find_edhoc_by_id_cred_peer(b"\xff")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (OscoreRequiredError("run EDHOC"), aiocoap.UNAUTHORIZED),
        (BadRequestError("bad"), aiocoap.BAD_REQUEST),
        (TooLargeError("big"), aiocoap.REQUEST_ENTITY_TOO_LARGE),
        (NotAuthorizedError("no"), aiocoap.FORBIDDEN),
        (ModeError("not now"), aiocoap.SERVICE_UNAVAILABLE),
        (UnavailableError("km away"), aiocoap.SERVICE_UNAVAILABLE),
    ],
    ids=["oscore", "bad", "big", "forbidden", "mode", "km"],
)
def test_refusals_as_coap_codes(error: IotdlmError, code: aiocoap.Code) -> None:
    out = coap_error(error, retry_after=7)
    assert out.code == code
    assert out.payload.startswith(error.code.encode() + b": ")
    assert (out.opt.max_age == 7) == (code == aiocoap.SERVICE_UNAVAILABLE)
    # and the device reads it back as the same kind of error
    back = _error_for(out, "sen")
    assert isinstance(back, CoapUnavailableError if code == aiocoap.SERVICE_UNAVAILABLE else RejectedError)


def test_load_or_make_key(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    key = load_or_make_key(path)
    assert path.stat().st_mode & 0o077 == 0
    assert load_or_make_key(path).private_numbers() == key.private_numbers()
    path.write_text("not a key")
    with pytest.raises(BadRequestError):
        load_or_make_key(path)


_codes = st.sampled_from(
    [aiocoap.BAD_REQUEST, aiocoap.UNAUTHORIZED, aiocoap.FORBIDDEN, aiocoap.NOT_FOUND, aiocoap.SERVICE_UNAVAILABLE,
     aiocoap.INTERNAL_SERVER_ERROR, aiocoap.CONTENT]
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(_codes, st.binary(max_size=400), st.one_of(st.none(), st.integers(0, 2**32 - 1)))
def test_device_reads_any_refusal(code: aiocoap.Code, payload: bytes, max_age: int | None) -> None:
    answer = aiocoap.Message(code=code, payload=payload)
    if max_age is not None:
        answer.opt.max_age = max_age
    err = _error_for(answer, "sen")
    assert isinstance(err, IotdlmError)
    assert len(err.message) < 400
