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


#: called with the current entry of the watched key, then with every change, in order;
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
        """Call ``handler`` with the current entry (or ``None``), then with every change, in order.

        A failing handler is logged and the watch goes on; ``unsubscribe`` ends it (closing the
        bus does too).
        """
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

    async def drain(self) -> None:
        """Finish in-flight work, stop taking new work, then close."""
        ...

    async def close(self) -> None: ...
