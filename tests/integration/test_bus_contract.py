"""The bus contract (iotdlm.bus.api), run on both implementations: in-memory and real NATS."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from iotdlm import errors
from iotdlm.bus import subjects
from iotdlm.bus.api import Bus, Message
from iotdlm.bus.memory import MemoryBus, MemoryHub
from tests.fixtures_nats import RunningNats

MakeBus = Callable[..., Awaitable[Bus]]

#: guard against hangs only; no assertion depends on how long anything takes
WAIT = 10.0


@pytest.fixture(params=["memory", pytest.param("nats", marks=pytest.mark.nats)])
def backend(request: pytest.FixtureRequest) -> MemoryHub | RunningNats:
    if request.param == "nats":
        running: RunningNats = request.getfixturevalue("nats_server")
        return running
    return MemoryHub()


@pytest.fixture
async def make_bus(backend: MemoryHub | RunningNats) -> AsyncIterator[MakeBus]:
    """``await make_bus("km")``: a bus for that module on the backend under test."""
    made: list[Bus] = []

    async def factory(module: str, **kwargs: Any) -> Bus:
        bus: Bus
        if isinstance(backend, MemoryHub):
            bus = MemoryBus(backend, module, **kwargs)
        else:
            bus = await backend.connect(module, **kwargs)
        made.append(bus)
        return bus

    try:
        yield factory
    finally:
        for bus in made:
            await bus.close()


def _logger_name(bus: Bus) -> str:
    return "iotdlm.bus.memory" if isinstance(bus, MemoryBus) else "iotdlm.bus.nats"


async def test_request_reply_round_trip(make_bus: MakeBus) -> None:
    km = await make_bus("km")
    pm = await make_bus("pm")
    seen: list[Message] = []

    async def issue(msg: Message) -> bytes:
        seen.append(msg)
        return b"cert-for:" + msg.data

    await km.serve(subjects.KM_ISSUE, issue)
    payload = bytes(range(256))
    assert await pm.request(subjects.KM_ISSUE, payload) == b"cert-for:" + payload
    assert await pm.request(subjects.KM_ISSUE, b"") == b"cert-for:"
    assert [m.subject for m in seen] == [subjects.KM_ISSUE, subjects.KM_ISSUE]
    assert seen[0].data == payload
    assert km.module == "km"
    assert pm.module == "pm"


@pytest.mark.parametrize(
    "err",
    [
        errors.NotAuthorizedError("pm may not issue for this fleet", field="csr", device_id="dev-42"),
        errors.ModeError("issuance is frozen in maintenance mode"),
        errors.TooLargeError("CSR over 64 KiB", field="csr"),
        errors.UnavailableError("database did not answer"),
        errors.PermissionDeniedError("no"),
    ],
    ids=lambda e: e.code,
)
async def test_error_reply_keeps_class_code_message_and_data(make_bus: MakeBus, err: errors.IotdlmError) -> None:
    km = await make_bus("km")
    pm = await make_bus("pm")

    async def refuse(msg: Message) -> bytes:
        raise err

    await km.serve(subjects.KM_ISSUE, refuse)
    with pytest.raises(errors.IotdlmError) as info:
        await pm.request(subjects.KM_ISSUE, b"csr")
    got = info.value
    assert type(got) is type(err)
    assert got.code == err.code
    assert got.message == err.message
    assert got.field == err.field
    assert got.device_id == err.device_id
    # the responder survives an error reply
    assert isinstance(got, errors.IotdlmError)


async def test_unknown_exception_becomes_generic_internal_error(
    make_bus: MakeBus, caplog: pytest.LogCaptureFixture
) -> None:
    km = await make_bus("km")
    pm = await make_bus("pm")

    async def crash(msg: Message) -> bytes:
        raise KeyError("secret-db-password-in-traceback")

    await km.serve(subjects.KM_ISSUE, crash)
    with caplog.at_level(logging.ERROR, logger=_logger_name(km)), pytest.raises(errors.InternalError) as info:
        await pm.request(subjects.KM_ISSUE, b"csr")
    assert type(info.value) is errors.InternalError
    assert info.value.code == "internal"
    assert "secret" not in info.value.message
    assert "KeyError" not in info.value.message
    logged = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], KeyError)]
    assert logged, "the handler's exception must be logged with its traceback"


async def test_no_responder_is_unavailable_naming_subject_and_module(make_bus: MakeBus) -> None:
    pm = await make_bus("pm")
    with pytest.raises(errors.UnavailableError) as info:
        await pm.request(subjects.KM_CHAIN, b"")
    assert type(info.value) is errors.UnavailableError
    assert subjects.KM_CHAIN in info.value.message
    assert "km" in info.value.message
    assert "running" in info.value.message


async def test_no_reply_within_timeout_is_unavailable(make_bus: MakeBus) -> None:
    km = await make_bus("km")
    pm = await make_bus("pm")
    never = asyncio.Event()

    async def stuck(msg: Message) -> bytes:
        await never.wait()
        return b""

    await km.serve(subjects.KM_ISSUE, stuck)
    with pytest.raises(errors.UnavailableError) as info:
        await pm.request(subjects.KM_ISSUE, b"", timeout=0.2)
    assert subjects.KM_ISSUE in info.value.message
    never.set()


async def test_queue_group_serves_each_request_exactly_once(make_bus: MakeBus) -> None:
    workers = [await make_bus("km"), await make_bus("km")]
    pm = await make_bus("pm")
    served: list[list[bytes]] = [[], []]

    def handler_for(i: int) -> Callable[[Message], Awaitable[bytes]]:
        async def handle(msg: Message) -> bytes:
            served[i].append(msg.data)
            return b"ok:" + msg.data

        return handle

    for i, w in enumerate(workers):
        await w.serve(subjects.KM_ISSUE, handler_for(i), queue=subjects.queue_group("km"))
    bodies = [f"req-{n}".encode() for n in range(200)]
    replies = await asyncio.wait_for(asyncio.gather(*(pm.request(subjects.KM_ISSUE, b) for b in bodies)), WAIT)
    assert replies == [b"ok:" + b for b in bodies]
    all_served = served[0] + served[1]
    assert len(all_served) == 200
    assert sorted(all_served) == sorted(bodies)
    assert served[0], "both workers of the queue group must get some requests"
    assert served[1], "both workers of the queue group must get some requests"


async def test_slow_handler_does_not_block_other_requests(make_bus: MakeBus) -> None:
    km = await make_bus("km")
    pm = await make_bus("pm")
    started = asyncio.Event()
    release = asyncio.Event()

    async def handle(msg: Message) -> bytes:
        if msg.data == b"slow":
            started.set()
            await release.wait()
        return msg.data

    await km.serve(subjects.KM_ISSUE, handle)
    slow = asyncio.create_task(pm.request(subjects.KM_ISSUE, b"slow", timeout=WAIT))
    await asyncio.wait_for(started.wait(), WAIT)
    assert await pm.request(subjects.KM_ISSUE, b"fast", timeout=WAIT) == b"fast"
    assert not slow.done()
    release.set()
    assert await slow == b"slow"


class _Collector:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._changed = asyncio.Event()

    async def __call__(self, msg: Message) -> None:
        self.messages.append(msg)
        self._changed.set()

    @property
    def subjects(self) -> list[str]:
        return [m.subject for m in self.messages]

    async def wait_for(self, predicate: Callable[[list[Message]], bool]) -> None:
        async def loop() -> None:
            while not predicate(self.messages):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(loop(), WAIT)


async def test_publish_fans_out_to_every_subscriber_and_one_per_queue_group(make_bus: MakeBus) -> None:
    km = await make_bus("km")
    admin1 = await make_bus("admin")
    admin2 = await make_bus("admin")
    a, b = _Collector(), _Collector()
    q1, q2 = _Collector(), _Collector()
    await admin1.subscribe(f"{subjects.EVENTS}.km.>", a)
    await admin2.subscribe(f"{subjects.EVENTS}.>", b)
    await admin1.subscribe(f"{subjects.EVENTS}.km.>", q1, queue="audit")
    await admin2.subscribe(f"{subjects.EVENTS}.km.>", q2, queue="audit")

    names = [subjects.events("km", f"certificate_issued.{n}") for n in range(20)]
    for n, name in enumerate(names):
        await km.publish(name, str(n).encode())
    await a.wait_for(lambda ms: len(ms) == 20)
    await b.wait_for(lambda ms: len(ms) == 20)
    await q1.wait_for(lambda ms: len(ms) + len(q2.messages) == 20)
    # per subscriber, messages from one publisher keep their order
    assert a.subjects == names
    assert b.subjects == names
    assert [m.data for m in a.messages] == [str(n).encode() for n in range(20)]
    assert sorted(q1.subjects + q2.subjects) == sorted(names)


async def test_wildcard_subscription_gets_only_matching_subjects(make_bus: MakeBus) -> None:
    admin = await make_bus("admin")
    got = _Collector()
    await admin.subscribe(f"{subjects.EVENTS}.*.started", got)
    sent = [
        subjects.events("km", "stopped"),
        subjects.events("km", "started"),
        subjects.events("pm", "started.again"),
        f"{subjects.EVENTS}.started",
        subjects.events("pm", "started"),
        subjects.events("zz", "started"),  # last: once it is in, everything before it was routed
    ]
    for s in sent:
        await admin.publish(s, b"")
    await got.wait_for(lambda ms: any(m.subject.endswith(".zz.started") for m in ms))
    assert got.subjects == [
        subjects.events("km", "started"),
        subjects.events("pm", "started"),
        subjects.events("zz", "started"),
    ]


async def test_unsubscribe_stops_delivery(make_bus: MakeBus) -> None:
    admin = await make_bus("admin")
    km = await make_bus("km")
    first, second = _Collector(), _Collector()
    sub1 = await admin.subscribe(f"{subjects.EVENTS}.km.>", first)
    await admin.subscribe(f"{subjects.EVENTS}.km.>", second)
    await km.publish(subjects.events("km", "one"), b"1")
    await first.wait_for(lambda ms: len(ms) == 1)
    await sub1.unsubscribe()
    await km.publish(subjects.events("km", "two"), b"2")
    await second.wait_for(lambda ms: len(ms) == 2)
    assert first.subjects == [subjects.events("km", "one")]

    served = await km.serve(subjects.KM_CHAIN, lambda m: _const(b"chain"))
    assert await admin.request(subjects.KM_CHAIN, b"") == b"chain"
    await served.unsubscribe()
    # once unsubscribe returned nothing is routed there: no responder (not a timeout)
    with pytest.raises(errors.UnavailableError, match="no responder"):
        await admin.request(subjects.KM_CHAIN, b"", timeout=WAIT)


async def _const(value: bytes) -> bytes:
    return value


async def test_drain_finishes_in_flight_handler(make_bus: MakeBus) -> None:
    km = await make_bus("km")
    pm = await make_bus("pm")
    started = asyncio.Event()
    release = asyncio.Event()
    calls = 0

    async def handle(msg: Message) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            await release.wait()
            return b"done"
        return b"late"

    await km.serve(subjects.KM_ISSUE, handle)
    first = asyncio.create_task(pm.request(subjects.KM_ISSUE, b"", timeout=WAIT))
    await asyncio.wait_for(started.wait(), WAIT)
    draining = asyncio.create_task(km.drain())

    # wait until the drain stopped taking requests (no responder any more)
    async def until_unsubscribed() -> None:
        # short probes, retried: on a loaded machine the server may take a while to drop the
        # subscription, and a probe caught in between times out (also "unavailable")
        while True:
            try:
                await pm.request(subjects.KM_ISSUE, b"", timeout=0.5)
            except errors.UnavailableError:
                return
            await asyncio.sleep(0.01)

    await asyncio.wait_for(until_unsubscribed(), WAIT * 3)
    assert not first.done()
    release.set()
    assert await first == b"done"
    await asyncio.wait_for(draining, WAIT)
    with pytest.raises(errors.UnavailableError):
        await km.publish(subjects.events("km", "after_drain"), b"")


async def test_payload_over_the_limit_is_too_large(make_bus: MakeBus) -> None:
    km = await make_bus("km")
    pm = await make_bus("pm")
    await km.serve(subjects.KM_ISSUE, lambda m: _const(b"ok"))
    big = b"x" * (8 * 1024 * 1024 + 1)
    with pytest.raises(errors.TooLargeError):
        await pm.request(subjects.KM_ISSUE, big)
    with pytest.raises(errors.TooLargeError):
        await pm.publish(subjects.events("pm", "big"), big)
    assert await pm.request(subjects.KM_ISSUE, b"small") == b"ok"


async def test_reply_over_the_limit_is_too_large(make_bus: MakeBus) -> None:
    km = await make_bus("km")
    pm = await make_bus("pm")
    await km.serve(subjects.KM_ISSUE, lambda m: _const(b"y" * (8 * 1024 * 1024 + 1)))
    with pytest.raises(errors.TooLargeError):
        await pm.request(subjects.KM_ISSUE, b"")


@pytest.mark.parametrize(
    ("module", "action", "subject"),
    [
        ("pm", "publish", subjects.KM_REVOKE),
        ("pm", "request", subjects.KM_REVOKE),
        ("sm", "request", subjects.KM_ISSUE),
        ("cm", "publish", subjects.events("km", "forged")),
        ("sm", "subscribe", f"{subjects.PREFIX}.km.>"),
        ("pm", "subscribe", f"{subjects.inbox_prefix('km')}.>"),
        ("km", "serve", f"{subjects.PREFIX}.>"),
        ("admin", "serve", subjects.KM_ISSUE),
    ],
)
async def test_operation_outside_permissions_is_refused(
    make_bus: MakeBus, module: str, action: str, subject: str
) -> None:
    bus = await make_bus(module)

    async def attempt() -> None:
        if action == "publish":
            await bus.publish(subject, b"x")
        elif action == "request":
            await bus.request(subject, b"x", timeout=WAIT)
        elif action == "subscribe":
            await bus.subscribe(subject, _Collector())
        else:
            await bus.serve(subject, lambda m: _const(b""))

    with pytest.raises(errors.PermissionDeniedError) as info:
        await attempt()
    assert info.value.code == "permission_denied"
    assert isinstance(info.value, errors.RejectedError)
    assert subject.lower() in info.value.message.lower()


async def test_invalid_subjects_are_programming_errors(make_bus: MakeBus) -> None:
    admin = await make_bus("admin")
    with pytest.raises(ValueError, match="wildcard"):
        await admin.publish(f"{subjects.PREFIX}.*", b"")
    with pytest.raises(ValueError, match="empty token"):
        await admin.publish(f"{subjects.PREFIX}..x", b"")
    with pytest.raises(ValueError, match="whitespace"):
        await admin.request(f"{subjects.PREFIX}.a b", b"")
    with pytest.raises(ValueError, match="last token"):
        await admin.subscribe(f"{subjects.EVENTS}.>.x", _Collector())
