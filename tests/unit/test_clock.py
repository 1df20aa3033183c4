"""The clock seam: IOTDLM_CLOCK_OFFSET moves SystemClock, and only well-formed offsets are taken."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotdlm.clock import OFFSET_ENV, FixedClock, SystemClock, offset_from_env, parse_offset


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("+400d", dt.timedelta(days=400)),
        ("3y", dt.timedelta(days=3 * 365)),
        ("-2h", dt.timedelta(hours=-2)),
        (" +90m ", dt.timedelta(minutes=90)),
        ("+0s", dt.timedelta(0)),
    ],
)
def test_offsets(text: str, expect: dt.timedelta) -> None:
    assert parse_offset(text) == expect


@pytest.mark.parametrize("text", ["400", "d", "+400 days", "1.5d", "++1d", "1w", "1e3d", "-", "9999999d"])
def test_malformed_offsets_are_refused_with_the_variable_named(text: str) -> None:
    with pytest.raises(ValueError, match=OFFSET_ENV):
        parse_offset(text)


_WELL_FORMED = re.compile(r"\s*[+-]?[0-9]{1,6}\s*[smhdy]\s*", re.ASCII)


@given(st.text(max_size=20))
def test_any_text_is_an_offset_or_a_value_error(text: str) -> None:
    if _WELL_FORMED.fullmatch(text):
        assert isinstance(parse_offset(text), dt.timedelta)
    else:
        with pytest.raises(ValueError, match=OFFSET_ENV):
            parse_offset(text)


def test_system_clock_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OFFSET_ENV, "+400d")
    assert offset_from_env() == dt.timedelta(days=400)
    ahead = SystemClock().now() - SystemClock(dt.timedelta(0)).now()
    assert dt.timedelta(days=400) - dt.timedelta(seconds=5) < ahead <= dt.timedelta(days=400)
    monkeypatch.delenv(OFFSET_ENV)
    assert offset_from_env() == dt.timedelta(0)
    assert offset_from_env({OFFSET_ENV: ""}) == dt.timedelta(0)


def test_fixed_clock_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    at = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    monkeypatch.setenv(OFFSET_ENV, "+3y")
    assert FixedClock(at).now() == at
