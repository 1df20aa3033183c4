"""The bus contract: request/reply, publish/subscribe, queue groups, structured error replies.

Two implementations honour it: :mod:`iotdlm.bus.nats` (a real NATS server) and
:mod:`iotdlm.bus.memory` (in-process, for fast unit tests). The same contract tests run on both.

Errors: a ``serve`` handler that raises :class:`iotdlm.errors.IotdlmError` makes the requester's
``request`` raise the same error class with the same code and message (rebuilt by
:func:`iotdlm.errors.from_wire`). Any other exception becomes :class:`iotdlm.errors.InternalError`
on the wire (the details stay in the server's log). No responder, or no answer within the
timeout, raises :class:`iotdlm.errors.UnavailableError`.

Key-value (:meth:`Bus.key_value`): small shared state every module may read and watch -- the
operation mode -- in a JetStream key-value bucket on NATS, a dict on the in-memory hub. Writing is
publishing to ``$KV.<bucket>.<key>``, so the permission table decides who may write (only the
supervisor, for the mode); reading needs the bucket's read API in the module's ``jetstream``
permissions. A refused read or write raises :class:`iotdlm.errors.PermissionDeniedError`, a
missing bucket :class:`iotdlm.errors.NotFoundError`, a server without JetStream
:class:`iotdlm.errors.UnavailableError`; bad bucket or key names are a ``ValueError``.

Append-only streams (:meth:`Bus.append_only_stream`): the audit log's third anchor (ADR 0005).
Only the supervisor creates one, only its writer publishes on its subject, readers get stream info
and message get; the same errors as key-value.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

#: header that marks a reply as an error; its value is the error code, the body is JSON of
#: ``IotdlmError.to_wire()``
ERROR_HEADER = "Iotdlm-Error"


@dataclass(frozen=True)
class Message:
    subject: str
    data: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


RequestHandler = Callable[[Message], Awaitable[bytes]]
EventHandler = Callable[[Message], Awaitable[None]]


class Subscription(Protocol):
    async def unsubscribe(self) -> None: ...


@dataclass(frozen=True)
class KeyValueEntry:
    """The value of one key; ``revision`` grows with every write to the bucket."""

    key: str
    value: bytes
    revision: int


#: called with the current entry of the watched key, then with its changes, in order;
#: ``None`` means the key has no value (never written, or deleted)
KeyValueHandler = Callable[[KeyValueEntry | None], Awaitable[None]]


class KeyValue(Protocol):
    """One key-value bucket. Keys: letters, digits and ``-/_=.``, not starting or ending in ``.``."""

    @property
    def bucket(self) -> str: ...

    async def get(self, key: str) -> KeyValueEntry | None:
        """The current value of ``key``, or ``None`` if it has none."""
        ...

    async def put(self, key: str, value: bytes) -> int:
        """Write ``key``; return the new revision."""
        ...

    async def delete(self, key: str) -> None: ...

    async def watch(self, key: str, handler: KeyValueHandler) -> Subscription:
        """Call ``handler`` with the current entry (or ``None``), then with each change, in order.

        A bucket keeps one value per key, so a value overwritten before the watch was handed it
        may be skipped (on NATS the server drops it from the stream): revisions only grow, and
        the watch always ends at the key's latest value. A failing handler is logged and the
        watch goes on; ``unsubscribe`` ends it (closing the bus does too).
        """
        ...


@dataclass(frozen=True)
class StreamEntry:
    """One message of an append-only stream and its sequence number there (from 1)."""

    seq: int
    data: bytes


class AppendOnlyStream(Protocol):
    """A stream that keeps every message published on its one subject, for good: a JetStream
    stream with deny_delete, deny_purge, no max age and file storage on NATS, a list on the
    in-memory hub. Nobody's permissions include updating, deleting or purging it, or deleting a
    message (which would switch those flags off or drop what it keeps)."""

    @property
    def name(self) -> str: ...

    async def append(self, data: bytes) -> int:
        """Publish ``data`` and wait for the stream's acknowledgement; return its sequence number."""
        ...

    async def read(self) -> list[StreamEntry]:
        """Every message the stream holds, oldest first."""
        ...


class Bus(Protocol):
    #: the module this connection belongs to (km, pm, sm, cm, admin)
    @property
    def module(self) -> str: ...

    async def request(self, subject: str, data: bytes, *, timeout: float = 5.0) -> bytes:  # noqa: ASYNC109
        """Send a request and return the reply body; error replies raise (see module doc)."""
        ...

    async def publish(self, subject: str, data: bytes) -> None: ...

    async def serve(self, subject: str, handler: RequestHandler, *, queue: str | None = None) -> Subscription:
        """Answer requests on ``subject`` with ``handler``; workers in one ``queue`` share the load."""
        ...

    async def subscribe(self, subject: str, handler: EventHandler, *, queue: str | None = None) -> Subscription: ...

    async def key_value(self, bucket: str, *, create: bool = False) -> KeyValue:
        """Open key-value ``bucket``; ``create`` makes it first if it does not exist (one value per
        key, kept on disk). Without ``create`` a missing bucket raises ``NotFoundError``."""
        ...

    async def append_only_stream(self, name: str, subject: str, *, create: bool = False) -> AppendOnlyStream:
        """The append-only stream ``name`` capturing ``subject``. Without ``create`` nothing is
        asked of the server yet (a publisher needs no JetStream API, only its subject); with it the
        stream is made if missing, and an existing one whose configuration is not append-only
        raises :class:`iotdlm.errors.ConflictError`."""
        ...

    async def drain(self) -> None:
        """Finish in-flight work, stop taking new work, then close."""
        ...

    async def close(self) -> None: ...
