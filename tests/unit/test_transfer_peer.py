"""The signed fetch request between providers (iotdlm.transfer.peer, docs/adr/0011): a round trip
with real keys, named hostile cases, and hypothesis on the parsers (arbitrary text and bytes,
mutated requests -> only iotdlm refusals)."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm.errors import BadRequestError, BadSignatureError, IotdlmError, RejectedError, UntrustedError
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.transfer import cose, peer
from iotdlm.transfer.identity import TransferIdentity
from tests.helpers import NOW, make_pki
from tests.unit.test_transfer_messages import SP1_ID, SP2_ID, transfer_identity

PKI = make_pki()
SP2 = transfer_identity(PKI, SP2_ID)
OTHER = transfer_identity(PKI, "urn:example:other")
TID = "ab" * 16


def fetch(
    ident: TransferIdentity = SP2, *, tid: str = TID, iss: str = SP2_ID, aud: str = SP1_ID, at: dt.datetime = NOW
) -> str:
    return peer.sign_fetch(tid, issuer=iss, audience=aud, now=at, signer=ident.signer(with_chain=False))


def verify(value: str, *, tid: str = TID, now: dt.datetime = NOW) -> peer.FetchRequest:
    return peer.verify_fetch(
        value, transfer_id=tid, provider_id=SP1_ID, peer_id=SP2_ID, pinned=SP2.certificate, now=now
    )


def test_a_fetch_request_round_trip() -> None:
    req = verify(fetch())
    assert (req.issuer, req.audience, req.transfer_id, req.issued_at) == (SP2_ID, SP1_ID, TID, NOW)
    assert len(req.cti) == 16
    assert fetch() != fetch()  # a new cti each time


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _header_resigned(change: Callable[[dict[int, Any]], None]) -> str:
    """A request whose claims were changed and signed again by SP2's own key (so only the claim
    check can refuse it)."""
    claims = {
        peer.CLAIM_ISS: SP2_ID, peer.CLAIM_AUD: SP1_ID, peer.CLAIM_IAT: int(NOW.timestamp()),
        peer.CLAIM_CTI: b"c" * 16, peer.CLAIM_TRANSFER: TID,
    }  # fmt: skip
    change(claims)
    return _b64(SP2.signer(with_chain=False).sign(cose.dumps(claims), typ=peer.TYP_FETCH))


CASES: dict[str, tuple[Callable[[], str], type[RejectedError], str]] = {
    "another provider's key": (lambda: fetch(OTHER), UntrustedError, "agreed for this transfer"),
    "the pinned certificate, another key": (
        lambda: fetch(dataclasses.replace(SP2, key=generate_key(Algorithm.P256))),
        BadSignatureError,
        "does not verify",
    ),
    "another transfer": (lambda: fetch(tid="cd" * 16), UntrustedError, "is for transfer"),
    "issued by someone else": (lambda: fetch(iss="urn:x"), UntrustedError, "issued by"),
    "for another provider": (lambda: fetch(aud="urn:x"), UntrustedError, "is for 'urn:x'"),
    "too old": (lambda: fetch(at=NOW - dt.timedelta(minutes=3)), UntrustedError, "more than 120 s"),
    "from the future": (lambda: fetch(at=NOW + dt.timedelta(minutes=3)), UntrustedError, "more than 120 s"),
    "not base64url": (lambda: "!!!", BadRequestError, "not base64url"),
    "too long": (lambda: "A" * 5000, BadRequestError, "too long"),
    "not COSE": (lambda: _b64(b"\xa0"), BadRequestError, "COSE_Sign1"),
    "wrong typ": (
        lambda: _b64(SP2.signer(with_chain=False).sign(b"\xa0", typ="x")),
        BadRequestError,
        "COSE typ",
    ),
    "an extra claim": (lambda: _header_resigned(lambda c: c.update({99: 1})), BadRequestError, "exactly"),
    "a short cti": (lambda: _header_resigned(lambda c: c.update({peer.CLAIM_CTI: b"x"})), BadRequestError, "cti"),
    "iat as text": (lambda: _header_resigned(lambda c: c.update({peer.CLAIM_IAT: "now"})), BadRequestError, "iat"),
    "a bad transfer id": (
        lambda: _header_resigned(lambda c: c.update({peer.CLAIM_TRANSFER: "X" * 32})),
        BadRequestError,
        "32 lower-case hex",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_fetch_requests_are_refused(name: str) -> None:
    make, error, words = CASES[name]
    with pytest.raises(error, match=words):
        verify(make())


def test_the_pinned_certificate_must_be_valid_now() -> None:
    later = SP2.certificate.not_valid_after_utc + dt.timedelta(days=1)
    with pytest.raises(UntrustedError):
        verify(fetch(at=later), now=later)


@pytest.mark.parametrize("tid", ["", "AB" * 16, "ab" * 15, "ab" * 17, "../" + "a" * 29, "ab" * 16 + "\n"])
def test_transfer_ids_from_paths(tid: str) -> None:
    with pytest.raises(BadRequestError, match="32 lower-case hex"):
        peer.check_tid(tid)


def test_relay_messages_round_trip_and_refuse_garbage() -> None:
    req = peer.PeerRequest(transfer_id=TID, body=b"\x00\xff")
    assert peer.decode_request(peer.encode(req)) == req
    rep = peer.PeerReply(transfer_id=TID, body=b"jws", summary="ok")
    assert peer.decode_reply(peer.encode(rep)) == rep
    with pytest.raises(BadRequestError):
        peer.decode_request(b'{"transfer_id": "x", "body": ""}')
    with pytest.raises(BadRequestError):
        peer.decode_request(b'{"transfer_id": "' + TID.encode() + b'", "body": "", "more": 1}')


# --- hypothesis -----------------------------------------------------------------------------------------
def _only_iotdlm(fn: Callable[[], object]) -> None:
    with contextlib.suppress(IotdlmError):
        fn()


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=400))
def test_fetch_parser_takes_arbitrary_text(text: str) -> None:
    _only_iotdlm(lambda: verify(text))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600))
def test_fetch_parser_takes_arbitrary_cose_bytes(data: bytes) -> None:
    _only_iotdlm(lambda: verify(_b64(data)))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_mutated_fetch_request_is_refused(data: st.DataObject) -> None:
    raw = bytearray(base64.urlsafe_b64decode(fetch() + "=="))
    original = bytes(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    mutated = bytes(raw[:cut]) if data.draw(st.booleans()) else bytes(raw)
    if mutated == original:
        return
    with pytest.raises(RejectedError):
        verify(_b64(mutated))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_relay_decoders_take_arbitrary_bytes(data: bytes) -> None:
    _only_iotdlm(lambda: peer.decode_request(data))
    _only_iotdlm(lambda: peer.decode_reply(data))
