"""A device's report of a refused transfer message (issue 13): cm's parser (named cases and
Hypothesis), its per-device limit, the device's reason codes, and the row detail status shows."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from iotdlm.clock import FixedClock
from iotdlm.cm.transfer_routes import RefusalLimiter, parse_refusal
from iotdlm.errors import (
    BadRequestError,
    BadSignatureError,
    ConflictError,
    RateLimitedError,
    ReplayError,
    RevokedSignerError,
    UnavailableError,
    UntrustedError,
)
from iotdlm.transfer import status as st
from iotdlm.transfer.messages import rejected_summary
from iotdlm.wire.transfer_device import MAX_REFUSAL_DETAIL, REFUSAL_REASONS, refusal_reason

SHA = "0f" * 32
T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "must be JSON"),
        (b"\xff\xfe", "must be JSON"),
        (b"[]", "must be"),
        (b'{"reason": "expired"}', "must be"),
        (b'{"reason": "expired", "detail": "x", "device": "d2"}', "must be"),
        (b'{"reason": "Expired", "detail": "x"}', "one of"),
        (b'{"reason": "nonsense", "detail": "x"}', "one of"),
        (b'{"reason": 3, "detail": "x"}', "one of"),
        (b'{"reason": "expired", "detail": ["x"]}', "detail"),
        (json.dumps({"reason": "expired", "detail": "x" * 801}).encode(), "detail"),
        (json.dumps({"reason": "expired", "detail": "x", "message": SHA.upper()}).encode(), "SHA-256"),
        (json.dumps({"reason": "expired", "detail": "x", "message": "ab"}).encode(), "SHA-256"),
        (json.dumps({"reason": "expired", "detail": "x", "message": 5}).encode(), "SHA-256"),
    ],
    ids=[
        "empty",
        "not-utf8",
        "list",
        "no-detail",
        "extra-field",
        "upper-reason",
        "unknown-reason",
        "int-reason",
        "list-detail",
        "long-detail",
        "upper-hash",
        "short-hash",
        "int-hash",
    ],
)
def test_bad_refusal_reports_are_refused_in_words(body: bytes, match: str) -> None:
    with pytest.raises(BadRequestError, match=match):
        parse_refusal(body)


def test_a_refusal_report_is_flattened_and_bounded() -> None:
    body = {"reason": "altered", "detail": "the signature\r\n of\x00 it " + "y" * 500, "message": SHA}
    reason, detail, message = parse_refusal(json.dumps(body).encode())
    assert (reason, message) == ("altered", SHA)
    assert detail.startswith("the signature of it y")
    assert len(detail) == MAX_REFUSAL_DETAIL
    assert parse_refusal(b'{"reason": "replayed", "detail": ""}') == ("replayed", "", "")


@given(hs.binary(max_size=400))
def test_any_refusal_body_parses_or_is_refused(body: bytes) -> None:
    try:
        reason, detail, message = parse_refusal(body)
    except BadRequestError:
        return
    assert reason in REFUSAL_REASONS
    assert len(detail) <= MAX_REFUSAL_DETAIL
    assert detail.isprintable()
    assert message == "" or len(message) == 64


@given(
    hs.fixed_dictionaries(
        {"reason": hs.one_of(hs.sampled_from(REFUSAL_REASONS), hs.text(max_size=30)), "detail": hs.text(max_size=900)},
        optional={"message": hs.one_of(hs.text(alphabet="0123456789abcdefABCDEF", max_size=70), hs.integers())},
    )
)
def test_any_refusal_json_parses_or_is_refused(data: dict[str, object]) -> None:
    try:
        reason, detail, _message = parse_refusal(json.dumps(data).encode())
    except BadRequestError:
        assert (
            data["reason"] not in REFUSAL_REASONS
            or len(str(data["detail"])) > 4 * MAX_REFUSAL_DETAIL
            or data.get("message", "") != ""
        )
        return
    assert reason == data["reason"]
    assert detail == " ".join("".join(c if c.isprintable() else " " for c in str(data["detail"])).split())[:200]


def test_each_device_is_limited_on_its_own() -> None:
    clock = FixedClock(T0)
    limiter = RefusalLimiter(clock, limit=3, window=dt.timedelta(minutes=10), max_keys=2)
    for _ in range(3):
        limiter.check("d1")
    with pytest.raises(RateLimitedError, match="report again later") as caught:
        limiter.check("d1")
    assert isinstance(caught.value, UnavailableError)  # retryable: HTTP 429 with Retry-After at cm
    limiter.check("d2")  # another device is not held back by d1
    clock.advance(dt.timedelta(minutes=10))
    limiter.check("d1")  # the window moved on
    # at most max_keys devices are remembered: the oldest is forgotten first
    limiter.check("d3")
    assert list(limiter._seen) == ["d1", "d3"]
    with pytest.raises(ValueError, match="limit"):
        RefusalLimiter(clock, limit=0)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ReplayError("seen", field="cti"), "replayed"),
        (ReplayError("late", field="exp"), "expired"),
        (ReplayError("early", field="nbf"), "not-yet-valid"),
        (ReplayError("early", field="iat"), "not-yet-valid"),
        (ReplayError("window", field="ResetTimeNotBefore"), "outside-reset-window"),
        (BadSignatureError("does not verify"), "altered"),
        (UntrustedError("not a transfer identity"), "wrong-signer"),
        (RevokedSignerError("retired"), "wrong-signer"),
        (UntrustedError("for d2", field="aud"), "wrong-device"),
        (UntrustedError("not a CA", field="trustAnchors"), "bad-anchors"),
        (ConflictError("running"), "busy"),
        (BadRequestError("not CBOR"), "malformed"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_the_device_names_its_refusal_from_the_check_that_failed(error: Exception, reason: str) -> None:
    assert isinstance(error, BadRequestError | ReplayError | BadSignatureError | UntrustedError | ConflictError)
    summary = rejected_summary(error)
    assert refusal_reason(summary["code"], summary.get("field")) == reason
    assert reason in REFUSAL_REASONS


def test_a_row_keeps_the_newest_refusals_and_counts_them_all() -> None:
    detail: dict[str, object] = {"window": [0, 1]}
    for i in range(st.KEEP_REFUSALS + 2):
        detail = st.with_refusal(detail, reason="expired", text=f"number {i}", at=T0.isoformat(), message="")
    assert detail["window"] == [0, 1]
    assert detail["refused"] == st.KEEP_REFUSALS + 2
    kept = detail["refusals"]
    assert isinstance(kept, list)
    assert len(kept) == st.KEEP_REFUSALS
    assert st.last_refusal(json.dumps(detail)) == f"expired: number {st.KEEP_REFUSALS + 1}"
    assert st.last_refusal(json.dumps({"window": [0, 1]})) == ""
    assert st.last_refusal("not json") == ""
    assert st.last_refusal(json.dumps({"refusals": ["x"]})) == ""
