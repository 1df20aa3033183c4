"""The download report (paper 4.4.5): one schema that sm writes and the repository reads."""

from __future__ import annotations

import datetime as dt

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm.errors import BadRequestError, IotdlmError
from iotdlm.wire.report import ReportBody, decode_report_body, verified_time

NOW = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)
SHA = "ab" * 32


def _body(**change: object) -> dict[str, object]:
    body: dict[str, object] = {
        "dtype": "boardA",
        "release_counter": 3,
        "target_path": "boardA/fw.bin",
        "sha256": SHA,
        "length": 10,
        "verified_at": "2026-11-21T12:00:00Z",
    }
    body.update(change)
    return body


def test_what_sm_writes_the_repository_reads() -> None:
    sent = ReportBody(
        dtype="boardA",
        release_counter=3,
        target_path="boardA/fw.bin",
        sha256=SHA,
        length=10,
        verified_at=NOW.astimezone(dt.timezone(dt.timedelta(hours=2))),
    )
    got = decode_report_body(msgspec.json.encode(sent))
    assert verified_time(got) == NOW
    assert verified_time(got).tzinfo == dt.UTC
    assert (got.dtype, got.release_counter, got.target_path, got.sha256, got.length) == (
        "boardA",
        3,
        "boardA/fw.bin",
        SHA,
        10,
    )


def test_unix_seconds_are_a_time() -> None:
    assert verified_time(decode_report_body(msgspec.json.encode(_body(verified_at=NOW.timestamp())))) == NOW


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"dtype": "../x"}, "dtype"),
        ({"release_counter": 0}, "release_counter"),
        ({"target_path": "boardB/fw.bin"}, "target_path"),
        ({"target_path": "boardA/../fw"}, "target_name"),
        ({"sha256": "AB" * 32}, "sha256"),
        ({"length": -1}, "length"),
        ({"verified_at": "2026-11-21T12:00:00"}, "verified_at"),
        ({"verified_at": 1e300}, "verified_at"),
    ],
    ids=["dtype", "counter", "path-dtype", "path-name", "sha-case", "length", "naive-time", "huge-time"],
)
def test_refused(change: dict[str, object], field: str) -> None:
    with pytest.raises(BadRequestError) as info:
        verified_time(decode_report_body(msgspec.json.encode(_body(**change))))
    assert info.value.field == field


def test_unknown_field_refused() -> None:
    with pytest.raises(BadRequestError):
        decode_report_body(msgspec.json.encode(_body(extra=1)))


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=300)
    | st.builds(
        msgspec.json.encode,
        st.fixed_dictionaries(
            {},
            optional={
                k: st.none() | st.integers() | st.floats() | st.text(max_size=70) | st.booleans()
                for k in ("dtype", "release_counter", "target_path", "sha256", "length", "verified_at", "x")
            },
        ),
    )
)
def test_any_bytes_are_a_report_or_refused(data: bytes) -> None:
    try:
        body = decode_report_body(data)
        when = verified_time(body)
    except IotdlmError:
        return
    assert when.tzinfo == dt.UTC
    assert body.target_path.startswith(body.dtype + "/")
