"""Time is passed in, never read from a global: services take a :class:`Clock`.

:class:`SystemClock` is the one place that reads the real clock. It honours
``IOTDLM_CLOCK_OFFSET`` (for example ``+400d`` or ``+3y``), which moves every process of a
deployment forward or back by the same amount. The test suite runs once more with the clock
400 days and 3 years ahead (``make test-future``), so a test that mixes a fixed date with
real-clock issuance fails on the day it is written, not on a later day. Leave it unset in
production: certificates issued on a shifted clock are not valid for relying parties on the
real one.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Mapping
from typing import Protocol

OFFSET_ENV = "IOTDLM_CLOCK_OFFSET"

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "y": 365 * 86400}
_OFFSET = re.compile(r"\s*([+-]?)([0-9]{1,6})\s*([smhdy])\s*", re.ASCII)


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """Timezone-aware UTC now."""
        ...


def parse_offset(text: str) -> dt.timedelta:
    """``+400d``, ``-2h``, ``3y`` (365 days a year) -> a timedelta; anything else is a ValueError."""
    m = _OFFSET.fullmatch(text)
    if m is None:
        raise ValueError(f"{OFFSET_ENV}={text!r}: expected a signed number and a unit s, m, h, d or y, e.g. +400d")
    seconds = int(m.group(2)) * _UNITS[m.group(3)]
    return dt.timedelta(seconds=-seconds if m.group(1) == "-" else seconds)


def offset_from_env(environ: Mapping[str, str] | None = None) -> dt.timedelta:
    """The offset ``IOTDLM_CLOCK_OFFSET`` asks for (zero when unset or empty)."""
    text = (os.environ if environ is None else environ).get(OFFSET_ENV, "")
    return parse_offset(text) if text.strip() else dt.timedelta(0)


class SystemClock:
    """The real clock, moved by ``IOTDLM_CLOCK_OFFSET`` when that is set (read once, here)."""

    def __init__(self, offset: dt.timedelta | None = None) -> None:
        self._offset = offset_from_env() if offset is None else offset

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self._offset


class FixedClock:
    """A clock for tests: starts at ``at`` and moves only when told."""

    def __init__(self, at: dt.datetime) -> None:
        if at.tzinfo is None:
            raise ValueError("FixedClock needs a timezone-aware datetime")
        self._now = at

    def now(self) -> dt.datetime:
        return self._now

    def advance(self, delta: dt.timedelta) -> None:
        self._now += delta
