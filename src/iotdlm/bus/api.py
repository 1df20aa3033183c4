"""The bus contract: request/reply, publish/subscribe, queue groups, structured error replies.

Two implementations honour it: :mod:`iotdlm.bus.nats` (a real NATS server) and
:mod:`iotdlm.bus.memory` (in-process, for fast unit tests). The same contract tests run on both.

Errors: a ``serve`` handler that raises :class:`iotdlm.errors.IotdlmError` makes the requester's
``request`` raise the same error class with the same code and message (rebuilt by
:func:`iotdlm.errors.from_wire`). Any other exception becomes :class:`iotdlm.errors.InternalError`
on the wire (the details stay in the server's log). No responder, or no answer within the
timeout, raises :class:`iotdlm.errors.UnavailableError`.
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

    async def drain(self) -> None:
        """Finish in-flight work, stop taking new work, then close."""
        ...

    async def close(self) -> None: ...
