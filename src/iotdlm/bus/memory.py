"""In-process bus: the same contract as :mod:`iotdlm.bus.nats`, without a server.

A :class:`MemoryHub` routes messages between the :class:`MemoryBus` connections made on it, with
NATS semantics: ``*`` matches one token, ``>`` one or more trailing tokens; plain subscribers all
get a message, the members of one queue group share it (each message goes to exactly one member);
a request gets the first reply. By default the hub also enforces
:data:`iotdlm.bus.subjects.PERMISSIONS` and the payload limit, as the embedded nats-server does,
so a unit test breaks where production would.

The helpers below the matching functions (error encoding, handler invocation) are shared with
:mod:`iotdlm.bus.nats`, so both implementations put the same bytes and headers on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from iotdlm import errors
from iotdlm.bus import subjects
from iotdlm.bus.api import (
    ERROR_HEADER,
    EventHandler,
    KeyValueEntry,
    KeyValueHandler,
    Message,
    RequestHandler,
    StreamEntry,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024
DEFAULT_MAX_CONCURRENT_HANDLERS = 256
DEFAULT_DRAIN_TIMEOUT = 30.0

# --- subjects ---------------------------------------------------------------------------------


def check_subject(subject: str, *, wildcards: bool) -> None:
    """Raise ``ValueError`` unless ``subject`` is a valid NATS subject (pattern if ``wildcards``).

    Tokens are non-empty and free of whitespace; ``*`` and ``>`` are wildcards only as whole
    tokens, and ``>`` only as the last one. Publishing needs a literal subject.
    """
    if not isinstance(subject, str) or not subject:
        raise ValueError("a subject must be a non-empty string")
    if any(ch.isspace() for ch in subject):
        raise ValueError(f"subject {subject!r} contains whitespace")
    tokens = subject.split(".")
    for i, tok in enumerate(tokens):
        if not tok:
            raise ValueError(f"subject {subject!r} has an empty token")
        if tok in ("*", ">"):
            if not wildcards:
                raise ValueError(f"cannot publish to the wildcard subject {subject!r}")
            if tok == ">" and i != len(tokens) - 1:
                raise ValueError(f"'>' must be the last token of {subject!r}")


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether the literal ``subject`` is matched by ``pattern`` (NATS wildcard rules)."""
    p = pattern.split(".")
    s = subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s):
            return False
        if tok != "*" and tok != s[i]:
            return False
    return len(p) == len(s)


def pattern_covers(allow: str, pattern: str) -> bool:
    """Whether every subject matched by ``pattern`` is matched by ``allow`` (NATS subset rule).

    This is how a subscribe permission is checked: ``iotdlm.v1.km.>`` covers
    ``iotdlm.v1.km.certificate.*`` but not ``iotdlm.v1.>``.
    """
    a = allow.split(".")
    p = pattern.split(".")
    for i, tok in enumerate(a):
        if tok == ">":
            return len(p) > i
        if i >= len(p):
            return False
        if p[i] == ">":
            return False
        if tok == "*":
            continue
        if p[i] != tok:  # a literal in ``allow`` needs the same literal (not '*') in ``pattern``
            return False
    return len(a) == len(p)


def owner_of(subject: str) -> str | None:
    """The module expected to serve ``subject`` (``iotdlm.v1.<module>...``), if it names one."""
    tokens = subject.split(".")
    if len(tokens) >= 3 and f"{tokens[0]}.{tokens[1]}" == subjects.PREFIX:
        name = tokens[2]
        if name == "events" and len(tokens) >= 4:
            name = tokens[3]
        if name in subjects.PERMISSIONS:
            return name
    return None


# --- key-value names (shared with the NATS bus) -----------------------------------------------

_BUCKET_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_KEY_RE = re.compile(r"[-/_=.A-Za-z0-9]{1,256}")


def check_bucket(bucket: str) -> None:
    """Raise ``ValueError`` unless ``bucket`` is a valid key-value bucket name."""
    if not isinstance(bucket, str) or _BUCKET_RE.fullmatch(bucket) is None:
        raise ValueError(f"bucket {bucket!r} must be 1-64 letters, digits, '-' or '_'")


def check_key(key: str) -> None:
    """Raise ``ValueError`` unless ``key`` is a valid key (letters, digits, ``-/_=.``)."""
    if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None or key.startswith(".") or key.endswith("."):
        raise ValueError(f"key {key!r} must be letters, digits or '-/_=.', not starting or ending with '.'")


# --- errors on the wire (shared with the NATS bus) --------------------------------------------


def no_responder_error(subject: str) -> errors.UnavailableError:
    owner = owner_of(subject)
    who = owner if owner is not None else "the module that serves it"
    return errors.UnavailableError(f"no responder on {subject}: is {who} running?")


def timeout_error(subject: str, timeout: float) -> errors.UnavailableError:
    owner = owner_of(subject)
    who = owner if owner is not None else "the module that serves it"
    return errors.UnavailableError(f"no reply on {subject} within {timeout:g} s: is {who} running and healthy?")


def encode_error(err: errors.IotdlmError) -> tuple[dict[str, str], bytes]:
    """Headers and body of an error reply: ``ERROR_HEADER: code`` and JSON of ``to_wire()``."""
    body = json.dumps(err.to_wire(), separators=(",", ":"), ensure_ascii=False).encode()
    return {ERROR_HEADER: err.code}, body


def error_code(headers: Mapping[str, str] | None) -> str | None:
    """The value of ``ERROR_HEADER`` (any letter case), or ``None`` for a normal reply."""
    if not headers:
        return None
    wanted = ERROR_HEADER.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def decode_reply(headers: Mapping[str, str] | None, data: bytes) -> bytes:
    """The body of a normal reply; an error reply raises the error it carries."""
    code = error_code(headers)
    if code is None:
        return data
    try:
        wire = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        wire = None
    if not isinstance(wire, dict):
        wire = {"code": code.strip() or "internal", "message": "the peer sent a malformed error reply"}
    raise errors.from_wire(wire)


async def call_handler(
    handler: RequestHandler, msg: Message, *, module: str, log: logging.Logger
) -> tuple[dict[str, str] | None, bytes]:
    """Run a ``serve`` handler; return the reply's headers (``None`` for success) and body.

    An :class:`~iotdlm.errors.IotdlmError` travels as is; any other exception is logged here and
    becomes a generic :class:`~iotdlm.errors.InternalError` (no details on the wire).
    """
    try:
        body = await handler(msg)
    except errors.IotdlmError as err:
        return encode_error(err)
    except Exception:
        log.exception("%s: handler for %s failed", module, msg.subject)
        return encode_error(_internal(module, msg.subject))
    if not isinstance(body, bytes | bytearray | memoryview):
        log.error("%s: handler for %s returned %s, not bytes", module, msg.subject, type(body).__name__)
        return encode_error(_internal(module, msg.subject))
    return None, bytes(body)


def _internal(module: str, subject: str) -> errors.InternalError:
    return errors.InternalError(f"{module} failed to handle a request on {subject}; details are in its log")


def permission_denied(module: str, action: str, subject: str) -> errors.PermissionDeniedError:
    return errors.PermissionDeniedError(
        f"the bus refused: {module} may not {action} {subject} (see iotdlm.bus.subjects.PERMISSIONS)"
    )


# --- the hub ----------------------------------------------------------------------------------

_Reply = tuple[dict[str, str] | None, bytes]


@dataclass
class _Delivery:
    msg: Message
    reply: asyncio.Future[_Reply] | None


@dataclass(eq=False)
class _MemSub:
    bus: MemoryBus
    pattern: str
    queue: str | None
    serve_handler: RequestHandler | None
    event_handler: EventHandler | None
    inbox: asyncio.Queue[_Delivery] = field(default_factory=asyncio.Queue)
    worker: asyncio.Task[None] | None = None
    #: false once unsubscribed: the worker stops after the message in hand
    active: bool = True
    #: true while an event handler runs (unsubscribe lets it finish)
    busy: bool = False


class MemoryHub:
    """Routes messages between the :class:`MemoryBus` connections made on it.

    ``permissions``: the table to enforce (default :data:`subjects.PERMISSIONS`); ``None`` turns
    enforcement off, so any module name may connect and use any subject.
    """

    def __init__(
        self,
        *,
        permissions: Mapping[str, subjects.Permissions] | None = subjects.PERMISSIONS,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ) -> None:
        self.permissions = permissions
        self.max_payload = max_payload
        self._subs: list[_MemSub] = []
        self._random = random.Random()  # noqa: S311 - load spreading, not security
        self._buckets: dict[str, _MemBucket] = {}
        self._streams: dict[str, _MemStreamData] = {}

    def bus(self, module: str) -> MemoryBus:
        """Shorthand for ``MemoryBus(self, module)``."""
        return MemoryBus(self, module)

    def _add(self, sub: _MemSub) -> None:
        self._subs.append(sub)

    def _remove(self, sub: _MemSub) -> None:
        with contextlib.suppress(ValueError):
            self._subs.remove(sub)

    def _route(self, msg: Message, reply: asyncio.Future[_Reply] | None) -> int:
        """Deliver ``msg`` to every plain subscriber and one member per queue group."""
        plain: list[_MemSub] = []
        groups: dict[str, list[_MemSub]] = {}
        for sub in self._subs:
            if subject_matches(sub.pattern, msg.subject):
                if sub.queue is None:
                    plain.append(sub)
                else:
                    groups.setdefault(sub.queue, []).append(sub)
        chosen = plain + [self._random.choice(members) for members in groups.values()]
        for sub in chosen:
            sub.bus._deliver(sub, _Delivery(msg, reply))
        return len(chosen)


@dataclass(eq=False)
class _MemBucket:
    name: str
    entries: dict[str, KeyValueEntry] = field(default_factory=dict)
    revision: int = 0
    watches: list[_MemWatch] = field(default_factory=list)

    def changed(self, key: str, entry: KeyValueEntry | None) -> None:
        for w in list(self.watches):
            if w.key == key:
                w.queue.put_nowait(entry)


class _MemWatch:
    """Feeds one watch's changes to its handler, one at a time, in order."""

    def __init__(self, bus: MemoryBus, bucket: _MemBucket, key: str, handler: KeyValueHandler) -> None:
        self.bus = bus
        self.bucket = bucket
        self.key = key
        self.queue: asyncio.Queue[KeyValueEntry | None] = asyncio.Queue()
        self._handler = handler
        self.worker = asyncio.get_running_loop().create_task(self._run(), name=f"memory-kv-{bucket.name}-{key}")

    async def _run(self) -> None:
        while True:
            entry = await self.queue.get()
            try:
                await self._handler(entry)
            except Exception:
                logger.exception("%s: watch handler for %s/%s failed", self.bus.module, self.bucket.name, self.key)

    async def unsubscribe(self) -> None:
        with contextlib.suppress(ValueError):
            self.bucket.watches.remove(self)
        self.bus._watches.discard(self)
        if self.worker is not asyncio.current_task():
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)


class _MemKeyValue:
    """:class:`iotdlm.bus.api.KeyValue` on a :class:`MemoryHub`: a dict, with the hub's permissions."""

    def __init__(self, bus: MemoryBus, bucket: _MemBucket) -> None:
        self._bus = bus
        self._bucket = bucket

    @property
    def bucket(self) -> str:
        return self._bucket.name

    def _read(self, key: str, what: str) -> None:
        check_key(key)
        self._bus._check_open(new_work=False)
        stream = subjects.kv_stream(self._bucket.name)
        self._bus._check_jetstream(f"$JS.API.DIRECT.GET.{stream}.{subjects.kv_subject(self._bucket.name, key)}", what)

    def _write(self, key: str, value: bytes) -> None:
        check_key(key)
        self._bus._check_open(new_work=False)
        subject = subjects.kv_subject(self._bucket.name, key)
        self._bus._check_publish(subject)
        self._bus._check_size(subject, value)

    async def get(self, key: str) -> KeyValueEntry | None:
        self._read(key, f"read {self._bucket.name}/{key}")
        return self._bucket.entries.get(key)

    async def put(self, key: str, value: bytes) -> int:
        self._write(key, value)
        b = self._bucket
        b.revision += 1
        entry = KeyValueEntry(key=key, value=bytes(value), revision=b.revision)
        b.entries[key] = entry
        b.changed(key, entry)
        return entry.revision

    async def delete(self, key: str) -> None:
        self._write(key, b"")
        b = self._bucket
        b.revision += 1
        b.entries.pop(key, None)
        b.changed(key, None)

    async def watch(self, key: str, handler: KeyValueHandler) -> _MemWatch:
        self._read(key, f"watch {self._bucket.name}/{key}")
        self._bus._check_open(new_work=True)
        self._bus._check_jetstream(f"$JS.API.CONSUMER.CREATE.{subjects.kv_stream(self._bucket.name)}", "watch")
        w = _MemWatch(self._bus, self._bucket, key, handler)
        w.queue.put_nowait(self._bucket.entries.get(key))
        self._bucket.watches.append(w)
        self._bus._watches.add(w)
        return w


@dataclass(eq=False)
class _MemStreamData:
    name: str
    subject: str
    entries: list[StreamEntry] = field(default_factory=list)


class _MemStream:
    """:class:`iotdlm.bus.api.AppendOnlyStream` on a :class:`MemoryHub`: a list that only grows."""

    def __init__(self, bus: MemoryBus, name: str, subject: str) -> None:
        self._bus = bus
        self._name = name
        self._subject = subject

    @property
    def name(self) -> str:
        return self._name

    def _data(self, what: str) -> _MemStreamData:
        found = self._bus._hub._streams.get(self._name)
        if found is None or found.subject != self._subject:
            raise errors.NotFoundError(
                f"{what}: no stream {self._name} captures {self._subject} (has the supervisor created it?)"
            )
        return found

    async def append(self, data: bytes) -> int:
        self._bus._check_open(new_work=False)
        self._bus._check_publish(self._subject)
        self._bus._check_size(self._subject, data)
        found = self._data(f"append to stream {self._name}")
        found.entries.append(StreamEntry(seq=len(found.entries) + 1, data=bytes(data)))
        return len(found.entries)

    async def read(self) -> list[StreamEntry]:
        self._bus._check_open(new_work=False)
        self._bus._check_jetstream(f"$JS.API.STREAM.INFO.{self._name}", f"read stream {self._name}")
        self._bus._check_jetstream(f"$JS.API.STREAM.MSG.GET.{self._name}", f"read stream {self._name}")
        return list(self._data(f"read stream {self._name}").entries)


class _MemSubscription:
    def __init__(self, bus: MemoryBus, sub: _MemSub) -> None:
        self._bus = bus
        self._sub = sub

    async def unsubscribe(self) -> None:
        await self._bus._unsubscribe(self._sub)


class MemoryBus:
    """One module's connection to a :class:`MemoryHub`; implements :class:`iotdlm.bus.api.Bus`.

    Request handlers run concurrently (at most ``max_concurrent_handlers`` at once); the event
    handler of one subscription sees its messages one at a time, in order.
    """

    def __init__(
        self,
        hub: MemoryHub,
        module: str,
        *,
        max_concurrent_handlers: int = DEFAULT_MAX_CONCURRENT_HANDLERS,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    ) -> None:
        if hub.permissions is not None and module not in hub.permissions:
            raise ValueError(
                f"unknown module {module!r}: the hub enforces permissions for {', '.join(hub.permissions)}"
            )
        if max_concurrent_handlers < 1:
            raise ValueError("max_concurrent_handlers must be at least 1")
        self._hub = hub
        self._module = module
        self._perms = hub.permissions[module] if hub.permissions is not None else None
        self._sem = asyncio.Semaphore(max_concurrent_handlers)
        self._drain_timeout = drain_timeout
        self._subs: list[_MemSub] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: set[asyncio.Future[_Reply]] = set()
        self._watches: set[_MemWatch] = set()
        self._draining = False
        self._closed = False

    @property
    def module(self) -> str:
        return self._module

    @property
    def is_closed(self) -> bool:
        return self._closed

    # --- checks -------------------------------------------------------------------------------

    def _check_open(self, *, new_work: bool) -> None:
        if self._closed:
            raise errors.UnavailableError(f"the bus connection of {self._module} is closed")
        if new_work and self._draining:
            raise errors.UnavailableError(f"the bus connection of {self._module} is draining")

    def _check_publish(self, subject: str) -> None:
        if self._perms is not None and (
            not any(subject_matches(a, subject) for a in self._perms.publish)
            or any(subject_matches(d, subject) for d in self._perms.deny_publish)
        ):
            raise permission_denied(self._module, "publish to", subject)

    def _check_subscribe(self, pattern: str) -> None:
        if self._perms is not None and not any(pattern_covers(a, pattern) for a in self._perms.subscribe):
            raise permission_denied(self._module, "subscribe to", pattern)

    def _check_jetstream(self, api_subject: str, what: str) -> None:
        if self._perms is not None and not any(subject_matches(a, api_subject) for a in self._perms.jetstream):
            raise permission_denied(self._module, what + " through", api_subject)

    def _check_size(self, subject: str, data: bytes) -> None:
        if len(data) > self._hub.max_payload:
            raise errors.TooLargeError(
                f"message to {subject} is {len(data)} bytes, over the bus limit of {self._hub.max_payload}"
            )

    # --- Bus ----------------------------------------------------------------------------------

    async def request(self, subject: str, data: bytes, *, timeout: float = 5.0) -> bytes:  # noqa: ASYNC109
        check_subject(subject, wildcards=False)
        self._check_open(new_work=False)
        self._check_publish(subject)
        self._check_size(subject, data)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_Reply] = loop.create_future()
        self._pending.add(fut)
        try:
            if self._hub._route(Message(subject, bytes(data), {}), fut) == 0:
                raise no_responder_error(subject)
            try:
                headers, body = await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise timeout_error(subject, timeout) from None
        finally:
            self._pending.discard(fut)
            if not fut.done():
                fut.cancel()
        return decode_reply(headers, body)

    async def publish(self, subject: str, data: bytes) -> None:
        check_subject(subject, wildcards=False)
        self._check_open(new_work=False)
        self._check_publish(subject)
        self._check_size(subject, data)
        self._hub._route(Message(subject, bytes(data), {}), None)

    async def serve(self, subject: str, handler: RequestHandler, *, queue: str | None = None) -> _MemSubscription:
        return self._add_sub(subject, queue, serve_handler=handler, event_handler=None)

    async def subscribe(self, subject: str, handler: EventHandler, *, queue: str | None = None) -> _MemSubscription:
        return self._add_sub(subject, queue, serve_handler=None, event_handler=handler)

    async def key_value(self, bucket: str, *, create: bool = False) -> _MemKeyValue:
        check_bucket(bucket)
        self._check_open(new_work=False)
        stream = subjects.kv_stream(bucket)
        self._check_jetstream(f"$JS.API.STREAM.INFO.{stream}", f"open bucket {bucket}")
        found = self._hub._buckets.get(bucket)
        if create:
            self._check_jetstream(f"$JS.API.STREAM.CREATE.{stream}", f"create bucket {bucket}")
            if found is None:
                found = self._hub._buckets[bucket] = _MemBucket(bucket)
        if found is None:
            raise errors.NotFoundError(f"no key-value bucket {bucket!r}: has its owner created it?")
        return _MemKeyValue(self, found)

    async def append_only_stream(self, name: str, subject: str, *, create: bool = False) -> _MemStream:
        check_bucket(name)
        check_subject(subject, wildcards=False)
        self._check_open(new_work=False)
        if create:
            self._check_jetstream(f"$JS.API.STREAM.INFO.{name}", f"create stream {name}")
            self._check_jetstream(f"$JS.API.STREAM.CREATE.{name}", f"create stream {name}")
            found = self._hub._streams.setdefault(name, _MemStreamData(name, subject))
            if found.subject != subject:
                raise errors.ConflictError(f"stream {name} exists and captures {found.subject}, not {subject}")
        return _MemStream(self, name, subject)

    def _add_sub(
        self,
        subject: str,
        queue: str | None,
        *,
        serve_handler: RequestHandler | None,
        event_handler: EventHandler | None,
    ) -> _MemSubscription:
        check_subject(subject, wildcards=True)
        if queue is not None:
            check_subject(queue, wildcards=False)
        self._check_open(new_work=True)
        self._check_subscribe(subject)
        sub = _MemSub(self, subject, queue, serve_handler, event_handler)
        sub.worker = asyncio.get_running_loop().create_task(self._work(sub), name=f"memory-bus-{subject}")
        self._subs.append(sub)
        self._hub._add(sub)
        return _MemSubscription(self, sub)

    async def _unsubscribe(self, sub: _MemSub) -> None:
        sub.active = False
        self._hub._remove(sub)
        with contextlib.suppress(ValueError):
            self._subs.remove(sub)
        # what is queued is dropped; a handler already running finishes
        while not sub.inbox.empty():
            sub.inbox.get_nowait()
            sub.inbox.task_done()
        if sub.worker is not None and not sub.busy:
            sub.worker.cancel()

    def _deliver(self, sub: _MemSub, delivery: _Delivery) -> None:
        sub.inbox.put_nowait(delivery)

    async def _work(self, sub: _MemSub) -> None:
        while sub.active:
            delivery = await sub.inbox.get()
            try:
                if sub.serve_handler is not None:
                    await self._sem.acquire()
                    task = asyncio.get_running_loop().create_task(self._answer(sub.serve_handler, delivery))
                    self._tasks.add(task)
                    task.add_done_callback(self._task_done)
                elif sub.event_handler is not None:
                    sub.busy = True
                    try:
                        await self._notify(sub.event_handler, delivery.msg)
                    finally:
                        sub.busy = False
            finally:
                sub.inbox.task_done()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._sem.release()

    async def _answer(self, handler: RequestHandler, delivery: _Delivery) -> None:
        reply = await call_handler(handler, delivery.msg, module=self._module, log=logger)
        if delivery.reply is None:
            return
        if self._perms is not None and not self._perms.allow_responses:
            logger.error("%s may not reply to requests (allow_responses is off); reply dropped", self._module)
            return
        if len(reply[1]) > self._hub.max_payload:
            reply = encode_error(errors.TooLargeError(f"the reply on {delivery.msg.subject} is over the bus limit"))
        if not delivery.reply.done():
            delivery.reply.set_result(reply)

    async def _notify(self, handler: EventHandler, msg: Message) -> None:
        try:
            await handler(msg)
        except Exception:
            logger.exception("%s: event handler for %s failed", self._module, msg.subject)

    async def drain(self) -> None:
        """Stop taking new messages, finish what was delivered and in-flight handlers, then close."""
        if self._closed or self._draining:
            return
        self._draining = True
        subs = list(self._subs)
        for sub in subs:
            self._hub._remove(sub)

        async def finish() -> None:
            for sub in subs:
                await sub.inbox.join()
            while self._tasks:
                await asyncio.wait(set(self._tasks))

        try:
            await asyncio.wait_for(finish(), self._drain_timeout)
        except TimeoutError:
            logger.warning("%s: drain timed out after %g s; cancelling what is left", self._module, self._drain_timeout)
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            self._hub._remove(sub)
        current = asyncio.current_task()
        pending: list[asyncio.Task[None]] = []
        for sub in self._subs:
            if sub.worker is not None and sub.worker is not current:
                sub.worker.cancel()
                pending.append(sub.worker)
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
                pending.append(task)
        self._subs.clear()
        for fut in list(self._pending):
            if not fut.done():
                fut.set_exception(errors.UnavailableError(f"the bus connection of {self._module} closed"))
        for w in list(self._watches):
            await w.unsubscribe()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
