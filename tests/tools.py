"""Helpers for the standard tools the tests run against what we emit (openssl, curl)."""

from __future__ import annotations

import datetime as dt

from iotdlm.clock import SystemClock, offset_from_env


def attime(at: dt.datetime | None = None) -> list[str]:
    """openssl's ``-attime``: verify at the test's clock (``at``, or the system clock, which
    ``IOTDLM_CLOCK_OFFSET`` moves), not at the machine's real time."""
    when = at if at is not None else SystemClock().now()
    return ["-attime", str(int(when.timestamp()))]


def ocsp_window() -> list[str]:
    """``openssl ocsp`` checks thisUpdate / nextUpdate against the machine's real clock (``-attime``
    does not reach that check). With ``IOTDLM_CLOCK_OFFSET`` set, widen its tolerance by the
    offset, so the check still runs and still fails on a response that is stale by our clock."""
    offset = abs(offset_from_env())
    return ["-validity_period", str(int(offset.total_seconds()) + 300)] if offset else []
