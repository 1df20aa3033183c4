"""The in-memory bus: subject matching, permissions, wire encoding of errors, concurrency."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm import errors
from iotdlm.bus import subjects
from iotdlm.bus.api import ERROR_HEADER, Message
from iotdlm.bus.memory import (
    MemoryBus,
    MemoryHub,
    check_subject,
    decode_reply,
    encode_error,
    owner_of,
    pattern_covers,
    subject_matches,
)

WAIT = 10.0

# --- subject matching against references ------------------------------------------------------

_LITERALS = ["a", "b", "c"]
_literal_subject = st.lists(st.sampled_from(_LITERALS), min_size=1, max_size=5).map(".".join)


@st.composite
def _patterns(draw: st.DrawFn, max_size: int = 5) -> str:
    tokens = draw(st.lists(st.sampled_from([*_LITERALS, "*"]), min_size=0, max_size=max_size))
    if draw(st.booleans()) or not tokens:
        tokens.append(">")
    return ".".join(tokens)


def _regex_matches(pattern: str, subject: str) -> bool:
    """Reference: translate the pattern to a regular expression."""
    parts = []
    for tok in pattern.split("."):
        if tok == "*":
            parts.append(r"[^.]+")
        elif tok == ">":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        else:
            parts.append(re.escape(tok))
    return re.fullmatch(r"\.".join(parts), subject) is not None


@settings(max_examples=500)
@given(_patterns(), _literal_subject)
def test_subject_matches_agrees_with_a_regex_reference(pattern: str, subject: str) -> None:
    assert subject_matches(pattern, subject) == _regex_matches(pattern, subject)


@given(_literal_subject)
def test_a_literal_pattern_matches_only_itself(subject: str) -> None:
    assert subject_matches(subject, subject)
    assert not subject_matches(subject, subject + ".a")
    assert not subject_matches(subject + ".a", subject)


def _covers_by_enumeration(allow: str, pattern: str) -> bool:
    """Reference: every subject over {a, b, c, z} (z: a literal neither pattern names), up to one
    token longer than the longer pattern, that ``pattern`` matches, ``allow`` matches too."""
    longest = max(len(allow.split(".")), len(pattern.split("."))) + 1
    for n in range(1, longest + 1):
        for tokens in itertools.product([*_LITERALS, "z"], repeat=n):
            s = ".".join(tokens)
            if _regex_matches(pattern, s) and not _regex_matches(allow, s):
                return False
    return True


@settings(max_examples=300, deadline=None)
@given(_patterns(max_size=3), _patterns(max_size=3))
def test_pattern_covers_agrees_with_enumeration(allow: str, pattern: str) -> None:
    assert pattern_covers(allow, pattern) == _covers_by_enumeration(allow, pattern)


@pytest.mark.parametrize(
    ("allow", "pattern", "expected"),
    [
        ("iotdlm.v1.km.>", "iotdlm.v1.km.certificate.*", True),
        ("iotdlm.v1.km.>", "iotdlm.v1.km.>", True),
        ("iotdlm.v1.km.>", "iotdlm.v1.>", False),
        ("iotdlm.v1.km.>", "iotdlm.v1.km", False),
        ("iotdlm.v1.*.x", "iotdlm.v1.km.x", True),
        ("iotdlm.v1.km.x", "iotdlm.v1.*.x", False),
        ("_INBOX.pm.>", "_INBOX.km.>", False),
    ],
)
def test_pattern_covers_examples(allow: str, pattern: str, expected: bool) -> None:
    assert pattern_covers(allow, pattern) is expected


@pytest.mark.parametrize(
    ("subject", "wildcards", "why"),
    [
        ("", True, "non-empty"),
        ("a..b", True, "empty token"),
        (".a", True, "empty token"),
        ("a.", True, "empty token"),
        ("a b", True, "whitespace"),
        ("a\tb", False, "whitespace"),
        ("a.>.b", True, "last token"),
        ("a.*", False, "wildcard"),
        ("a.>", False, "wildcard"),
    ],
)
def test_check_subject_rejects(subject: str, wildcards: bool, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_subject(subject, wildcards=wildcards)


@pytest.mark.parametrize("subject", ["a", "a.b", "a.*.c", "a.>", ">", "*", "_INBOX.km.x", "$JS.API.INFO"])
def test_check_subject_accepts(subject: str) -> None:
    check_subject(subject, wildcards=True)


def test_owner_of_names_the_serving_module() -> None:
    assert owner_of(subjects.KM_ISSUE) == "km"
    assert owner_of(subjects.SM_SOFTWARE_LOAD) == "sm"
    assert owner_of(subjects.CM_EGRESS + ".http") == "cm"
    assert owner_of(subjects.events("pm", "x")) == "pm"
    assert owner_of("iotdlm.v1.nobody.x") is None
    assert owner_of("other.v1.km.x") is None


# --- the permission table ---------------------------------------------------------------------


def test_every_module_may_subscribe_to_its_own_inbox_only() -> None:
    for module, perms in subjects.PERMISSIONS.items():
        assert any(pattern_covers(a, f"{subjects.inbox_prefix(module)}.>") for a in perms.subscribe)
        for other in subjects.MODULES:
            if other != module:
                assert not any(pattern_covers(a, f"{subjects.inbox_prefix(other)}.>") for a in perms.subscribe)


@pytest.mark.parametrize(
    ("module", "subject", "allowed"),
    [
        ("pm", subjects.KM_ISSUE, True),
        ("pm", subjects.KM_ISSUE_BATCH, True),
        ("pm", subjects.KM_REVOKE, False),
        ("pm", subjects.SM_SOFTWARE_LOAD, True),
        ("sm", subjects.KM_ISSUE, False),
        ("sm", subjects.CM_EGRESS + ".fetch", True),
        ("cm", subjects.KM_RENEW, True),
        ("cm", subjects.KM_OCSP, True),
        ("cm", subjects.KM_EST + ".simpleenroll", True),
        ("cm", subjects.KM_ISSUE, False),
        ("km", subjects.KM_ISSUE, False),
        ("admin", subjects.KM_REVOKE, True),
    ],
)
async def test_memory_bus_enforces_publish_permissions(module: str, subject: str, allowed: bool) -> None:
    hub = MemoryHub()
    bus = MemoryBus(hub, module)
    try:
        if allowed:
            await bus.publish(subject, b"")
        else:
            with pytest.raises(errors.PermissionDeniedError):
                await bus.publish(subject, b"")
    finally:
        await bus.close()


async def test_unknown_module_needs_a_hub_without_permissions() -> None:
    with pytest.raises(ValueError, match="unknown module"):
        MemoryBus(MemoryHub(), "intruder")
    hub = MemoryHub(permissions=None)
    a, b = MemoryBus(hub, "test-a"), MemoryBus(hub, "test-b")
    await a.serve("any.thing", _echo)
    assert await b.request("any.thing", b"hi") == b"hi"
    await a.close()
    await b.close()


async def test_a_module_without_allow_responses_cannot_answer() -> None:
    hub = MemoryHub()
    admin, km = MemoryBus(hub, "admin"), MemoryBus(hub, "km")
    await admin.serve(subjects.events("km", "ask"), _echo)  # admin may subscribe to events
    with pytest.raises(errors.UnavailableError, match="no reply"):
        await km.request(subjects.events("km", "ask"), b"", timeout=0.1)
    await admin.close()
    await km.close()


# --- wire encoding ----------------------------------------------------------------------------


async def _echo(msg: Message) -> bytes:
    return msg.data


def test_error_encoding_is_header_plus_json_body() -> None:
    err = errors.ConflictError("already revoked", device_id="d1")
    headers, body = encode_error(err)
    assert headers == {ERROR_HEADER: "conflict"}
    assert json.loads(body) == {"code": "conflict", "message": "already revoked", "device_id": "d1"}
    with pytest.raises(errors.ConflictError) as info:
        decode_reply(headers, body)
    assert info.value.device_id == "d1"


def test_decode_reply_passes_normal_replies_and_survives_malformed_errors() -> None:
    assert decode_reply(None, b"body") == b"body"
    assert decode_reply({"Other": "x"}, b"body") == b"body"
    with pytest.raises(errors.NotFoundError, match="malformed"):
        decode_reply({ERROR_HEADER.lower(): "not_found"}, b"\xff not json")
    with pytest.raises(errors.InternalError):
        decode_reply({ERROR_HEADER: "no_such_code"}, b'{"code": "no_such_code", "message": "?"}')


# --- behaviour specific to the memory bus ------------------------------------------------------


@pytest.fixture
async def buses(memory_hub: MemoryHub) -> Any:
    made: list[MemoryBus] = []

    def make(module: str, **kwargs: Any) -> MemoryBus:
        bus = MemoryBus(memory_hub, module, **kwargs)
        made.append(bus)
        return bus

    yield make
    for bus in made:
        await bus.close()


async def test_handler_concurrency_is_bounded(buses: Any) -> None:
    km = buses("km", max_concurrent_handlers=2)
    pm = buses("pm")
    running = 0
    peak = 0
    release = asyncio.Event()

    async def handle(msg: Message) -> bytes:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        return msg.data

    await km.serve(subjects.KM_ISSUE, handle)
    requests = [asyncio.create_task(pm.request(subjects.KM_ISSUE, bytes([i]), timeout=WAIT)) for i in range(5)]
    for _ in range(50):  # let every delivery run as far as it can
        await asyncio.sleep(0)
    assert running == 2
    release.set()
    assert await asyncio.gather(*requests) == [bytes([i]) for i in range(5)]
    assert peak == 2


async def test_handler_returning_non_bytes_is_an_internal_error(buses: Any, caplog: pytest.LogCaptureFixture) -> None:
    km, pm = buses("km"), buses("pm")

    async def wrong(msg: Message) -> Any:
        return "a str"

    await km.serve(subjects.KM_ISSUE, wrong)
    with caplog.at_level(logging.ERROR, logger="iotdlm.bus.memory"), pytest.raises(errors.InternalError):
        await pm.request(subjects.KM_ISSUE, b"")
    assert any("not bytes" in r.getMessage() for r in caplog.records)


async def test_failing_event_handler_is_logged_and_keeps_its_subscription(
    buses: Any, caplog: pytest.LogCaptureFixture
) -> None:
    admin, km = buses("admin"), buses("km")
    got: list[bytes] = []
    done = asyncio.Event()

    async def flaky(msg: Message) -> None:
        if msg.data == b"bad":
            raise RuntimeError("boom")
        got.append(msg.data)
        if msg.data == b"last":
            done.set()

    await admin.subscribe(subjects.events("km", ">"), flaky)
    with caplog.at_level(logging.ERROR, logger="iotdlm.bus.memory"):
        for data in (b"first", b"bad", b"last"):
            await km.publish(subjects.events("km", "x"), data)
        await asyncio.wait_for(done.wait(), WAIT)
    assert got == [b"first", b"last"]
    assert any(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in caplog.records)


async def test_close_fails_pending_requests_and_later_calls(buses: Any) -> None:
    km, pm = buses("km"), buses("pm")
    started = asyncio.Event()

    async def stuck(msg: Message) -> bytes:
        started.set()
        await asyncio.Event().wait()
        return b""

    await km.serve(subjects.KM_ISSUE, stuck)
    pending = asyncio.create_task(pm.request(subjects.KM_ISSUE, b"", timeout=WAIT))
    await asyncio.wait_for(started.wait(), WAIT)
    await pm.close()
    with pytest.raises(errors.UnavailableError, match="closed"):
        await pending
    with pytest.raises(errors.UnavailableError):
        await pm.publish(subjects.events("pm", "x"), b"")
    assert pm.is_closed
    await km.close()  # cancels the stuck handler instead of waiting for it
    assert km.is_closed


async def test_unsubscribe_from_inside_the_handler(buses: Any) -> None:
    admin, km = buses("admin"), buses("km")
    got: list[bytes] = []
    second_sub_got: list[bytes] = []
    holder: dict[str, Any] = {}

    async def once(msg: Message) -> None:
        got.append(msg.data)
        await holder["sub"].unsubscribe()

    async def other(msg: Message) -> None:
        second_sub_got.append(msg.data)

    holder["sub"] = await admin.subscribe(subjects.events("km", "x"), once)
    await admin.subscribe(subjects.events("km", "x"), other)
    for data in (b"1", b"2", b"3"):
        await km.publish(subjects.events("km", "x"), data)
    for _ in range(50):
        await asyncio.sleep(0)
    assert second_sub_got == [b"1", b"2", b"3"]
    assert got == [b"1"]


async def test_drain_waits_for_queued_events(buses: Any) -> None:
    admin, km = buses("admin"), buses("km")
    got: list[bytes] = []
    gate = asyncio.Event()

    async def slow(msg: Message) -> None:
        await gate.wait()
        got.append(msg.data)

    await admin.subscribe(subjects.events("km", "x"), slow)
    for data in (b"1", b"2", b"3"):
        await km.publish(subjects.events("km", "x"), data)
    draining = asyncio.create_task(admin.drain())
    await asyncio.sleep(0)
    await km.publish(subjects.events("km", "x"), b"after drain started")
    gate.set()
    await asyncio.wait_for(draining, WAIT)
    assert got == [b"1", b"2", b"3"]
    assert admin.is_closed


async def test_drain_timeout_cancels_stuck_handlers(buses: Any, caplog: pytest.LogCaptureFixture) -> None:
    km, pm = buses("km", drain_timeout=0.05), buses("pm")
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck(msg: Message) -> bytes:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b""

    await km.serve(subjects.KM_ISSUE, stuck)
    pending = asyncio.create_task(pm.request(subjects.KM_ISSUE, b"", timeout=WAIT))
    await asyncio.wait_for(started.wait(), WAIT)
    with caplog.at_level(logging.WARNING, logger="iotdlm.bus.memory"):
        await asyncio.wait_for(km.drain(), WAIT)
    assert cancelled.is_set()
    assert any("drain timed out" in r.getMessage() for r in caplog.records)
    pending.cancel()


async def test_serve_and_subscribe_refused_while_draining(buses: Any) -> None:
    km = buses("km")
    await km.drain()
    with pytest.raises(errors.UnavailableError):
        await km.serve(subjects.KM_ISSUE, _echo)
