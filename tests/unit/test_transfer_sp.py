"""The providers' pure machines (SP1, SP2), per-device statuses, and the attestation verifier."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools

import pytest

from iotdlm.errors import ConflictError, ReplayError, UntrustedError
from iotdlm.pki.chain import der
from iotdlm.pki.keys import sign_bytes
from iotdlm.transfer import attestation, cose, sp1, sp2
from iotdlm.transfer import messages as m
from iotdlm.transfer import status as st
from tests.helpers import NOW
from tests.unit.test_transfer_messages import DEVICES, SP1_ID, SP2_ID, P, claims

WINDOW = (NOW - dt.timedelta(hours=1), NOW + dt.timedelta(days=7))


def _entropy() -> sp1.Entropy:
    counter = itertools.count()
    return lambda n: next(counter).to_bytes(n, "big")


def exported() -> tuple[sp1.Sp1Transfer, bytes]:
    devs = [
        sp1.ExportDevice(d, der(c), *WINDOW, m.VersionInfo(1, "u"), attestation.measure(b"fw"))
        for d, (_k, c) in DEVICES.items()
    ]
    return sp1.export(
        devs,
        provider_id=SP1_ID,
        peer_id=SP2_ID,
        peer_certificate=P.sp2.certificate,
        now=NOW,
        key=P.sp1.key,
        certificate=P.sp1.certificate,
    )


def accepted() -> tuple[sp1.Sp1Transfer, sp2.Sp2Transfer, bytes]:
    t1, uil = exported()
    t2, _verified, effects = sp2.on_update_info(uil, NOW, pinned=P.sp1.certificate, provider_id=SP2_ID, peer_id=SP1_ID)
    assert t2.transfer_ref == t1.transfer_ref
    assert [type(e).__name__ for e in effects] == ["Register", "Track"]
    reg = effects[0]
    assert isinstance(reg, sp2.Register)
    assert m.decode_x5bag(reg.x5bag)[0] == DEVICES["d1"][1]
    t2 = sp2.registered(t2, "https://ca2.example/.well-known/est")
    t2, tm = sp2.transfer_message(t2, NOW, claims=claims(), signer=P.sp2.signer(with_chain=False), entropy=_entropy())
    return t1, t2, tm


def test_sp1_takes_the_transfer_message_once() -> None:
    t1, _t2, tm = accepted()
    t1b, effects = sp1.on_transfer_message(t1, tm, NOW)
    assert [type(e).__name__ for e in effects] == ["Accepted"]
    assert t1b.accepted is not None
    assert sp1.Sp1Transfer.from_json(t1b.to_json()) == t1b
    _t, effects = sp1.on_transfer_message(t1b, tm, NOW)
    (e,) = effects
    assert isinstance(e, sp1.Refused)
    assert isinstance(e.error, ReplayError)


def test_sp1_refuses_a_transfer_message_for_another_transfer() -> None:
    t1, t2, _tm = accepted()
    other = dataclasses.replace(t2, transfer_ref=b"x" * 32)
    _s, tm = sp2.transfer_message(other, NOW, claims=claims(), signer=P.sp2.signer(with_chain=False))
    _t, effects = sp1.on_transfer_message(t1, tm, NOW)
    (e,) = effects
    assert isinstance(e, sp1.Refused)
    assert "another UpdateInfoList" in e.error.message


def test_device_messages_copy_the_fields_and_narrow_the_window() -> None:
    t1, _t2, tm = accepted()
    t1, _ = sp1.on_transfer_message(t1, tm, NOW)
    short = (NOW - dt.timedelta(hours=2), NOW + dt.timedelta(hours=5))
    msgs, skipped = sp1.device_messages(
        t1,
        {"d1": WINDOW, "d2": short, "d3": (NOW - dt.timedelta(days=3), NOW - dt.timedelta(days=2))},
        NOW,
        signer=P.sp1.signer(with_chain=True),
        fallback_uri="https://sp1.example/updates",
        entropy=_entropy(),
    )
    assert set(msgs) == {"d1", "d2"}
    assert "overlap" in skipped["d3"]
    got = {}
    for d, token in msgs.items():
        msg, chain = m.peek_device_message(token)
        assert chain[0] == P.sp1.certificate
        got[d] = m.TransferMessage.from_payload(msg.payload, what="x")
    assert got["d1"].header.audience == "d1"
    assert got["d1"].header.cti != got["d2"].header.cti
    assert got["d1"].claims.fallback_uri == "https://sp1.example/updates"
    assert got["d1"].claims.enroll_uri == claims().enroll_uri
    assert got["d1"].claims.reset_not_after == claims().reset_not_after
    assert got["d2"].claims.reset_not_after == short[1]
    assert got["d2"].header.expires == short[1]


def test_device_messages_need_an_accepted_transfer_message() -> None:
    t1, _uil = exported()
    with pytest.raises(ConflictError):
        sp1.device_messages(t1, {"d1": WINDOW}, NOW, signer=P.sp1.signer(with_chain=True), fallback_uri="https://x")


def test_confirmation_leads_to_revocation_of_known_devices_only() -> None:
    t1, t2, _tm = accepted()
    conf = sp2.confirmation(
        t2, [m.Enrolled("d1", b"h" * 32)], NOW, signer=P.sp2.signer(with_chain=False), entropy=_entropy()
    )
    t1b, effects = sp1.on_confirmation(t1, conf, NOW, devices=["d1", "d2"])
    assert [type(e).__name__ for e in effects] == ["SetStatus", "RevokeOld"]
    assert effects[1] == sp1.RevokeOld(("d1",))
    _t, effects = sp1.on_confirmation(t1b, conf, NOW, devices=["d1", "d2"])
    assert isinstance(effects[0], sp1.Refused)  # replayed
    stranger = sp2.confirmation(t2, [m.Enrolled("zz", b"h" * 32)], NOW, signer=P.sp2.signer(with_chain=False))
    _t, effects = sp1.on_confirmation(t1, stranger, NOW, devices=["d1"])
    (e,) = effects
    assert isinstance(e, sp1.Refused)
    assert isinstance(e.error, UntrustedError)
    with pytest.raises(ConflictError):
        sp2.confirmation(t2, [], NOW, signer=P.sp2.signer(with_chain=False))


def test_sp2_state_round_trips() -> None:
    _t1, t2, _tm = accepted()
    assert sp2.Sp2Transfer.from_json(t2.to_json()) == t2


@pytest.mark.parametrize(
    ("current", "new", "result"),
    [
        (st.PENDING, st.RESET, st.RESET),
        (st.RESET, st.ENROLLED, st.ENROLLED),
        (st.ATTESTED, st.ATTESTED, st.ATTESTED),
        (st.ENROLLED, st.REVOKED_AT_CA1, st.REVOKED_AT_CA1),
        (st.FAILED_FALLBACK, st.RESET, st.RESET),
        (st.UPDATED, st.FAILED_FALLBACK, st.FAILED_FALLBACK),
    ],
)
def test_status_moves_forward(current: str, new: str, result: str) -> None:
    assert st.advance(current, new) == result


@pytest.mark.parametrize(
    ("current", "new"),
    [(st.ENROLLED, st.RESET), (st.REVOKED_AT_CA1, st.FAILED_FALLBACK), (st.UPDATED, st.ATTESTED)],
)
def test_status_never_moves_back(current: str, new: str) -> None:
    with pytest.raises(ConflictError):
        st.advance(current, new)


# --- attestation ------------------------------------------------------------------------------------------
KEY, FACTORY = DEVICES["d1"]
REFERENCE = attestation.Reference("d1", m.sha256(der(FACTORY)).hex(), attestation.measure(b"fw"))


def evidence(nonce: bytes, *, measurement: bytes | None = None, device_id: str = "d1", key: object = KEY) -> bytes:
    return attestation.make_evidence(
        lambda b: sign_bytes(key, b),  # type: ignore[arg-type]
        KEY.public_key(),  # type: ignore[arg-type]
        FACTORY,
        nonce=nonce,
        device_id=device_id,
        measurement=measurement if measurement is not None else attestation.measure(b"fw"),
    )


def test_attestation_good_evidence_passes_once() -> None:
    ch = attestation.challenge("d1", b"n" * 16, NOW)
    state, verdict = attestation.verify(ch, evidence(b"n" * 16), NOW, reference=REFERENCE)
    assert verdict.ok
    assert state is None
    _s, again = attestation.verify(state, evidence(b"n" * 16), NOW, reference=REFERENCE)
    assert not again.ok
    assert "no challenge" in again.reason


@pytest.mark.parametrize(
    ("name", "ev", "now", "reason"),
    [
        ("wrong nonce", lambda: evidence(b"x" * 16), NOW, "nonce"),
        ("late", lambda: evidence(b"n" * 16), NOW + dt.timedelta(hours=1), "expired"),
        ("other firmware", lambda: evidence(b"n" * 16, measurement=b"\x00" * 32), NOW, "differs"),
        ("not the factory key", lambda: evidence(b"n" * 16, key=DEVICES["d2"][0]), NOW, "signature"),
        ("claims another device", lambda: evidence(b"n" * 16, device_id="d2"), NOW, "no challenge"),
        ("garbage", lambda: b"\x00\x01", NOW, "CBOR"),
    ],
)
def test_attestation_refusals(name: str, ev: object, now: dt.datetime, reason: str) -> None:
    ch = attestation.challenge("d1", b"n" * 16, NOW)
    _state, verdict = attestation.verify(ch, ev(), now, reference=REFERENCE)  # type: ignore[operator]
    assert not verdict.ok
    assert reason in verdict.reason


def test_attestation_needs_the_registered_factory_certificate() -> None:
    ch = attestation.challenge("d1", b"n" * 16, NOW)
    other = dataclasses.replace(REFERENCE, factory_fingerprint="0" * 64)
    _s, verdict = attestation.verify(ch, evidence(b"n" * 16), NOW, reference=other)
    assert not verdict.ok
    assert "registered factory" in verdict.reason
    evidence_msg = cose.parse_sign1(evidence(b"n" * 16), what="e", max_bytes=1 << 14)
    assert evidence_msg.typ == attestation.TYP_EVIDENCE
