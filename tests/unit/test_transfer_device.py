"""The device's pure trust-transfer state machine: what it accepts, what it refuses (named
hostile cases), the steps, retries, rollback and fallback, the commit and what it retires."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm.errors import ConflictError
from iotdlm.pki.chain import der
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.pki.names import DEFAULT_ENTERPRISE_NUMBER, device_subject, device_uri
from iotdlm.pki.profiles import DEFAULT_PROFILES
from iotdlm.transfer import cose, device
from iotdlm.transfer import messages as m
from iotdlm.transfer.device import DeviceState, Phase, Step, StepResult
from tests.helpers import NOW, ORG
from tests.unit.test_transfer_messages import P, claims, transfer_identity

DEV = "d1"
#: the device holds SP1's root, and SP1's transfer certificate and its CA (the x5t names the former)
TRUST = [P.pki1.root, *P.sp1.chain]
#: what /cacerts at CA2's enrollURI returns (fetched unauthenticated; the message's hashes pick the anchors)
FETCHED = [P.pki2.cas["operational"].certificate, P.pki2.root]
CONFIG = {"device_id": DEV, "dtype": "sensor", "enroll_uri": "https://ca1/.well-known/est", "secret_sp1": "x"}
REF = b"r" * 32


def device_message(
    *, signer: cose.CoseSigner | None = None, aud: str = DEV, cti: bytes = b"c" * 16, **claim_kw: Any
) -> bytes:
    hdr = m.CwtHeader(
        issuer=None,
        audience=aud,
        cti=cti,
        issued_at=NOW,
        not_before=NOW,
        expires=NOW + dt.timedelta(days=1),
    )
    c = claims(fallback_uri="https://sp1.example/fallback", **claim_kw)
    return m.sign_device_message(m.TransferMessage(hdr, REF, c), signer or P.sp1.signer(with_chain=False))


def receive(
    token: bytes,
    state: DeviceState | None = None,
    now: dt.datetime = NOW,
    truststore: list[x509.Certificate] = TRUST,
) -> tuple[DeviceState, list[Any]]:
    return device.receive(state or DeviceState(DEV), token, now, truststore=truststore, config=CONFIG)


def fetched(state: DeviceState, certs: list[x509.Certificate] = FETCHED) -> tuple[DeviceState, list[Any]]:
    """The agent carried out FetchAnchors: /cacerts at the enrollURI returned ``certs``."""
    result = StepResult(Step.ANCHORS, ok=True, ca_certificates=tuple(der(c) for c in certs))
    return device.step_done(state, result, NOW)


def refused(effects: list[Any]) -> dict[str, Any]:
    assert len(effects) == 1
    (e,) = effects
    assert isinstance(e, device.Log)
    assert e.event == "transfer_refused"
    return dict(e.data)


def test_accept_resets_to_the_agreed_state_fetches_anchors_and_asks_for_attestation() -> None:
    state, effects = receive(device_message())
    assert state.phase is Phase.RESET
    assert state.seen == (((b"c" * 16).hex(), m.epoch(NOW + dt.timedelta(days=1))),)
    kinds = [type(e).__name__ for e in effects]
    assert kinds == ["Log", "Backup", "WriteConfig", "Log", "FetchAnchors"]
    assert effects[-1] == device.FetchAnchors(claims().enroll_uri)
    state, after = fetched(state)
    assert [type(e).__name__ for e in after] == ["AddTrustAnchors", "Log", "Attest"]
    (config,) = [e.config for e in effects if isinstance(e, device.WriteConfig)]
    assert "secret_sp1" not in config  # only the agreed state survives the reset
    assert config["dtype"] == "sensor"
    assert config["enroll_uri"] == claims().enroll_uri
    assert config["fallback_uri"] == "https://sp1.example/fallback"
    (anchors,) = [e.certificates for e in after if isinstance(e, device.AddTrustAnchors)]
    assert anchors == (der(P.pki2.root),)  # only what the signed hash names, of all /cacerts returned


def test_anchors_held_already_need_no_fetch() -> None:
    state, effects = receive(device_message(), truststore=[*TRUST, P.pki2.root])
    kinds = [type(e).__name__ for e in effects]
    assert kinds == ["Log", "Backup", "AddTrustAnchors", "WriteConfig", "Log", "Attest"]
    assert state.pending is not None
    assert state.pending.anchors == (der(P.pki2.root),)


@pytest.mark.parametrize(
    ("name", "certs", "match"),
    [
        ("none named", [P.pki1.root, P.pki2.cas["operational"].certificate], "/cacerts"),
        ("nothing", [], "/cacerts"),
    ],
)
def test_anchors_not_among_cacerts_fall_back(name: str, certs: list[x509.Certificate], match: str) -> None:
    state, _ = receive(device_message())
    state, effects = fetched(state, certs)
    assert state.phase is Phase.FALLBACK
    assert match in state.last_outcome  # type: ignore[operator]
    assert any(isinstance(e, device.Rollback) for e in effects)


def test_anchor_named_is_a_leaf_falls_back() -> None:
    other_leaf = OTHER_PKI.certificate
    state, _ = receive(device_message(trust_anchors=(cose.cert_hash(der(other_leaf)),)))
    state, _effects = fetched(state, [other_leaf])
    assert state.phase is Phase.FALLBACK
    assert "not a CA" in state.last_outcome  # type: ignore[operator]


def _resign(change: Callable[[dict[int, Any]], None]) -> bytes:
    raw = cbor2.loads(cose.parse_sign1(device_message(), what="t", max_bytes=1 << 16).payload)
    change(raw)
    return P.sp1.signer(with_chain=False).sign(cose.dumps(raw), typ=m.TYP_DEVICE_TRANSFER)


OTHER_PKI = transfer_identity(P.pki2, "sp2")
OTHER_PKI_SIGNER = OTHER_PKI.signer(with_chain=True)
ADMIN_LIKE = transfer_identity(P.pki1, "x", module="admin").signer(with_chain=True)
SP1_CA_ONLY = [P.pki1.root, P.sp1.chain[1]]  # a device that does not hold SP1's transfer certificate
LEAF = P.sp1.certificate


@pytest.mark.parametrize(
    ("name", "make", "code", "match"),
    [
        ("another device's", lambda: device_message(aud="d2"), "untrusted", "not this device"),
        ("signer outside the truststore", lambda: device_message(signer=OTHER_PKI_SIGNER), "untrusted", "root"),
        ("a service certificate that is not the transfer identity", lambda: device_message(signer=ADMIN_LIKE),
         "untrusted", "transfer signing"),
        ("neither x5t nor x5chain", lambda: device_message(signer=cose.CoseSigner(P.sp1.key)), "bad_request",
         "no x5t, no x5chain"),
        ("x5t names a certificate the device does not hold", lambda: device_message(
            signer=OTHER_PKI.signer(with_chain=False)), "untrusted", "does not hold"),
        ("x5t names a held certificate, signed by another key", lambda: device_message(
            signer=cose.CoseSigner(OTHER_PKI.key, P.sp1.chain)), "bad_signature", "signature"),
        ("a held trust anchor that is not a CA", lambda: device_message(
            trust_anchors=(cose.cert_hash(der(LEAF)),)), "untrusted", "not a CA"),
        ("altered", lambda: _flip(device_message()), "bad_signature", "signature"),
        ("reset window over", lambda: device_message(reset_not_after=NOW - dt.timedelta(hours=1),
                                                     reset_not_before=NOW - dt.timedelta(hours=2)), "replay", "window"),
        ("reset window not yet open", lambda: device_message(reset_not_before=NOW + dt.timedelta(hours=1)),
         "replay", "window"),
        ("an unagreed claim", lambda: _resign(lambda c: c.__setitem__(-70042, b"x")), "bad_request", "not agreed"),
        ("garbage", lambda: b"\xff\x00", "bad_request", "CBOR"),
    ],
)  # fmt: skip
def test_refusals_are_logged_and_change_nothing(name: str, make: Callable[[], bytes], code: str, match: str) -> None:
    before = DeviceState(DEV)
    state, effects = receive(make(), before)
    assert state == before
    r = refused(effects)
    assert r["code"] == code, r
    assert match in r["message"]


def _flip(token: bytes) -> bytes:
    b = bytearray(token)
    b[-70] ^= 1
    return bytes(b)


def test_replay_and_expiry() -> None:
    token = device_message()
    state, _ = receive(token)
    state2, effects = receive(token, state)
    assert refused(effects)["code"] == "replay"
    assert state2 == state
    # expired (and its cti has been forgotten: the time check refuses it on its own)
    late = NOW + dt.timedelta(days=2)
    fresh = DeviceState(DEV, seen=state.seen)
    state3, effects = receive(token, fresh, late)
    assert refused(effects)["field"] == "exp"
    assert state3.seen == ()  # purged: an expired message needs no cti any more


def test_a_second_transfer_while_one_runs_is_refused() -> None:
    state, _ = receive(device_message())
    _s, effects = receive(device_message(cti=b"d" * 16), state)
    assert refused(effects)["code"] == "conflict"


def _enroll_result() -> StepResult:
    key = generate_key(Algorithm.P256)
    ca2 = P.pki2.cas["operational"]
    cert = ca2.issue(
        DEFAULT_PROFILES["operational"],
        key.public_key(),
        device_subject(DEV, ORG, "sensor"),
        now=NOW,
        serial=x509.random_serial_number(),
        uris=[device_uri(DEV, enterprise_number=DEFAULT_ENTERPRISE_NUMBER)],
    )
    return StepResult(
        Step.ENROLL, ok=True, certificate=der(cert), ca_certificates=(der(ca2.certificate), der(P.pki2.root))
    )


def test_steps_in_order_then_commit_retires_sp1() -> None:
    state, _ = receive(device_message())
    state, effects = fetched(state)
    assert isinstance(effects[-1], device.Attest)
    state, effects = device.step_done(state, StepResult(Step.ATTEST, ok=True), NOW)
    assert state.phase is Phase.ATTESTED
    assert isinstance(effects[-1], device.Update)
    state, effects = device.step_done(state, StepResult(Step.UPDATE, ok=True), NOW)
    assert state.phase is Phase.UPDATED
    assert isinstance(effects[-1], device.Enroll)
    assert effects[-1].anchors == (der(P.pki2.root),)
    state, effects = device.step_done(state, _enroll_result(), NOW)
    assert state.phase is Phase.COMMITTED
    (commit,) = [e for e in effects if isinstance(e, device.Commit)]
    assert der(P.pki2.root) in commit.truststore
    assert der(P.pki1.root) not in commit.truststore
    assert commit.config["dtype"] == "sensor"
    assert "fallback_uri" not in commit.config
    assert len(state.retired_signers) == 1
    # FR3: SP1's key is retired; even with SP1's root still trusted the device refuses it
    _s, effects = device.receive(state, device_message(cti=b"e" * 16), NOW, truststore=TRUST, config=CONFIG)
    assert "former provider" in refused(effects)["message"]
    # and its x5chain form too
    chained = device_message(cti=b"g" * 16, signer=P.sp1.signer(with_chain=True))
    _s, effects = device.receive(state, chained, NOW, truststore=TRUST, config=CONFIG)
    assert "former provider" in refused(effects)["message"]


def test_steps_skip_what_the_message_does_not_ask() -> None:
    state, effects = receive(device_message(ra_uri=None, update_first=False, trust_anchors=()))
    assert isinstance(effects[-1], device.Enroll)
    with pytest.raises(ConflictError, match="enroll is the step"):
        device.step_done(state, StepResult(Step.ATTEST, ok=True), NOW)


def test_transient_failures_are_retried_then_fall_back() -> None:
    state, _ = fetched(receive(device_message(ra_uri=None, update_first=False))[0])
    fail = StepResult(Step.ENROLL, ok=False, detail="unavailable: connection refused")
    state, effects = device.step_done(state, fail, NOW)
    assert [type(e).__name__ for e in effects] == ["Log", "Enroll"]
    state, effects = device.step_done(state, fail, NOW)
    state, effects = device.step_done(state, fail, NOW)
    assert state.phase is Phase.FALLBACK
    assert [type(e).__name__ for e in effects] == ["Log", "Rollback", "Log", "ReportFallback"]
    report = effects[-1]
    assert isinstance(report, device.ReportFallback)
    assert report.fallback_uri == "https://sp1.example/fallback"
    assert "3 attempts" in report.reason
    state, effects = device.fallback_done(state, False, NOW, "down")
    assert state.phase is Phase.FALLBACK  # still to report
    assert device.next_effect(state) == report
    state, _ = device.fallback_done(state, True, NOW)
    assert state.phase is Phase.IDLE
    assert state.retired_signers == ()  # nothing retired: still under SP1


@pytest.mark.parametrize(
    "result",
    [
        StepResult(Step.ATTEST, ok=False, permanent=True, detail="measurement differs"),
    ],
)
def test_permanent_failure_falls_back_at_once(result: StepResult) -> None:
    state, _ = fetched(receive(device_message())[0])
    state, effects = device.step_done(state, result, NOW)
    assert state.phase is Phase.FALLBACK
    assert any(isinstance(e, device.Rollback) for e in effects)


def test_enrollment_that_does_not_check_out_falls_back() -> None:
    state, _ = fetched(receive(device_message(ra_uri=None, update_first=False))[0])
    good = _enroll_result()
    other = dataclasses.replace(good, ca_certificates=(der(P.pki1.cas["operational"].certificate),))
    wrong_root_claims = device_message(
        ra_uri=None, update_first=False, trust_anchors=(cose.cert_hash(der(P.pki1.root)),), cti=b"f" * 16
    )
    s1, _ = device.step_done(state, dataclasses.replace(good, certificate=None), NOW)
    assert s1.phase is Phase.FALLBACK
    s2, _ = receive(wrong_root_claims)  # SP1's root, held: no fetch
    s2, _effects = device.step_done(s2, other, NOW)
    assert s2.phase is Phase.FALLBACK
    assert "not acceptable" in s2.last_outcome  # type: ignore[operator]


def test_signer_by_x5chain_for_a_device_without_the_transfer_certificate() -> None:
    """SP1 may send the x5chain (``deliver --with-chain``) to devices that do not hold its transfer
    certificate; a device holding only the CA refuses the x5t form."""
    with_chain = device_message(signer=P.sp1.signer(with_chain=True))
    state, _ = receive(with_chain, truststore=SP1_CA_ONLY)
    assert state.phase is Phase.RESET
    _s, effects = receive(device_message(cti=b"h" * 16), truststore=SP1_CA_ONLY)
    assert "does not hold" in refused(effects)["message"]


def test_held_signer_must_still_be_valid_and_chain_in_the_truststore() -> None:
    """A transfer certificate in the truststore is not an anchor of its own: it is checked at now
    and up to another certificate the device holds."""
    later = P.sp1.certificate.not_valid_after_utc + dt.timedelta(days=1)
    _s, effects = receive(device_message(), now=later)
    assert "not valid at" in refused(effects)["message"]
    _s, effects = receive(device_message(), truststore=[P.sp1.certificate])
    assert "does not chain" in refused(effects)["message"]


def test_reset_window_closing_mid_transfer_falls_back() -> None:
    state, _ = fetched(receive(device_message())[0])
    later = NOW + dt.timedelta(days=2)
    state, _effects = device.step_done(state, StepResult(Step.ATTEST, ok=True), later)
    assert state.phase is Phase.FALLBACK
    assert "window closed" in state.last_outcome  # type: ignore[operator]


def test_state_round_trips_through_json() -> None:
    state, _ = receive(device_message())
    assert DeviceState.from_json(state.to_json()) == state
    state, _ = fetched(state)
    state, _ = device.step_done(state, StepResult(Step.ATTEST, ok=True), NOW)
    assert DeviceState.from_json(state.to_json()) == state
    fb, _ = device.step_done(state, StepResult(Step.UPDATE, ok=False, permanent=True), NOW)
    assert DeviceState.from_json(fb.to_json()) == fb


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=600))
def test_receive_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    state = DeviceState(DEV)
    new, effects = receive(data, state)
    assert new == state
    refused(effects)
