"""The bus over a real NATS server (nats-py). With :mod:`iotdlm.bus.nats_kv` (its key-value buckets),
the only module of iotdlm that imports ``nats``.

Each module connects as its own NATS user (see :mod:`iotdlm.bus.server`), and its replies come on
its own inbox prefix (:func:`iotdlm.bus.subjects.inbox_prefix`), which is all it may subscribe to
besides its request subjects.

Error mapping (see :mod:`iotdlm.bus.api` for the contract):

- no responder, timeout, connection closed or lost -> :class:`~iotdlm.errors.UnavailableError`
- payload over the server's ``max_payload`` -> :class:`~iotdlm.errors.TooLargeError`
- the server refused a publish or a subscription (NATS permissions) ->
  :class:`~iotdlm.errors.PermissionDeniedError`. The server reports that asynchronously; this
  module confirms publishes and subscriptions with a PING/PONG round trip (the server answers in
  order, so a refusal arrives before the PONG) and a request races its reply against the refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as _NatsSub
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue as _NatsKV

from iotdlm import errors
from iotdlm.aio import cancel_and_wait
from iotdlm.bus import cluster, subjects, urls
from iotdlm.bus.api import EventHandler, Message, RequestHandler
from iotdlm.bus.memory import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_MAX_CONCURRENT_HANDLERS,
    call_handler,
    check_bucket,
    check_subject,
    decode_reply,
    encode_error,
    no_responder_error,
    permission_denied,
    timeout_error,
)
from iotdlm.bus.nats_kv import NatsKeyValue, NatsWatch
from iotdlm.bus.nats_stream import NatsStream

_T = TypeVar("_T")

#: how long close() waits for cancelled handlers and for the connection to close
_CLOSE_TIMEOUT = 5.0

logger = logging.getLogger(__name__)

#: how long a publish/subscribe confirmation (PING/PONG) may take before the bus is unavailable
CONFIRM_TIMEOUT = 5.0

# nats-py lower-cases the server's -ERR text:
#   permissions violation for publish to "subject"
#   permissions violation for subscription to "subject" using queue "q"
_VIOLATION = re.compile(r'permissions violation for (publish|subscription) to "([^"]*)"')

_UNAVAILABLE = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.FlushTimeoutError,
    nats.errors.StaleConnectionError,
)


class _Watch:
    """Futures waiting for a permissions violation on one (kind, subject), or on any subject that
    starts with one of some prefixes (JetStream calls, whose exact subjects nats-py chooses)."""

    def __init__(self) -> None:
        self._waiters: dict[tuple[str, str], set[asyncio.Future[str]]] = {}
        self._prefixed: list[tuple[str, tuple[str, ...], asyncio.Future[str]]] = []

    @contextlib.contextmanager
    def watch_prefixes(self, kind: str, prefixes: Sequence[str]) -> Iterator[asyncio.Future[str]]:
        """The future gets the refused subject."""
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        item = (kind, tuple(p.lower() for p in prefixes), fut)
        self._prefixed.append(item)
        try:
            yield fut
        finally:
            with contextlib.suppress(ValueError):
                self._prefixed.remove(item)
            if not fut.done():
                fut.cancel()

    @contextlib.contextmanager
    def watch(self, kind: str, subject: str) -> Iterator[asyncio.Future[str]]:
        key = (kind, subject.lower())
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, set()).add(fut)
        try:
            yield fut
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(fut)
                if not waiters:
                    del self._waiters[key]
            if not fut.done():
                fut.cancel()

    def report(self, kind: str, subject: str, text: str) -> bool:
        waiters = self._waiters.get((kind, subject.lower()), set())
        for fut in waiters:
            if not fut.done():
                fut.set_result(text)
        hit = bool(waiters)
        low = subject.lower()
        for k, prefixes, pfut in self._prefixed:
            if k == kind and low.startswith(prefixes):
                hit = True
                if not pfut.done():
                    pfut.set_result(subject)
        return hit


class _NatsSubscription:
    def __init__(self, bus: NatsBus, sub: _NatsSub, events: _EventQueue | None) -> None:
        self._bus = bus
        self._sub = sub
        self._events = events

    async def unsubscribe(self) -> None:
        """Stop delivery; when it returns the server no longer routes messages here.

        Queued events are dropped; handlers already running finish.
        """
        await self._bus._unsubscribe(self)


class _EventQueue:
    """Feeds one subscription's messages to its event handler, one at a time, in order."""

    def __init__(self, bus: NatsBus, handler: EventHandler) -> None:
        self.queue: asyncio.Queue[Msg] = asyncio.Queue()
        self.active = True
        self.busy = False
        self._bus = bus
        self._handler = handler
        self.worker = asyncio.get_running_loop().create_task(self._run())

    async def put(self, msg: Msg) -> None:
        self.queue.put_nowait(msg)

    async def _run(self) -> None:
        while self.active:
            msg = await self.queue.get()
            self.busy = True
            try:
                await self._handler(_to_message(msg))
            except Exception:
                logger.exception("%s: event handler for %s failed", self._bus.module, msg.subject)
            finally:
                self.busy = False
                self.queue.task_done()

    def stop(self) -> None:
        """Drop what is queued; a handler already running finishes."""
        self.active = False
        while not self.queue.empty():
            self.queue.get_nowait()
            self.queue.task_done()
        if not self.busy:
            self.worker.cancel()


def _to_message(msg: Msg) -> Message:
    return Message(subject=msg.subject, data=bytes(msg.data), headers=dict(msg.headers or {}))


class NatsBus:
    """:class:`iotdlm.bus.api.Bus` over a connected nats-py client. Build it with :func:`connect`.

    Request handlers run concurrently, at most ``max_concurrent_handlers`` at once (further
    requests wait in the subscription's buffer); the event handler of one subscription sees its
    messages one at a time, in order. ``confirm_publish`` makes :meth:`publish` wait for the server
    (one round trip) so a refused publish raises; without it a refusal is only logged.
    """

    def __init__(
        self,
        client: Client,
        *,
        module: str,
        url: str,
        max_concurrent_handlers: int = DEFAULT_MAX_CONCURRENT_HANDLERS,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        confirm_publish: bool = True,
        jetstream_replicas: int = 0,
    ) -> None:
        cluster.check_replicas(jetstream_replicas)
        if max_concurrent_handlers < 1:
            raise ValueError("max_concurrent_handlers must be at least 1")
        self._nc = client
        self._module = module
        self._url = url
        self._sem = asyncio.Semaphore(max_concurrent_handlers)
        self._drain_timeout = drain_timeout
        self._confirm_publish = confirm_publish
        self._replicas = jetstream_replicas
        self._watch = _Watch()
        self._subs: list[_NatsSubscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._kv_watches: set[NatsWatch] = set()
        self._js: JetStreamContext | None = None
        self._draining = False
        self._closed = False

    @property
    def module(self) -> str:
        return self._module

    @property
    def url(self) -> str:
        return self._url

    @property
    def is_closed(self) -> bool:
        return self._closed or self._nc.is_closed

    @property
    def is_connected(self) -> bool:
        return bool(self._nc.is_connected)

    @property
    def max_payload(self) -> int:
        return int(self._nc.max_payload)

    def replicas(self) -> int:
        """Replicas of a bucket or stream made now (``[nats] jetstream_replicas``, ADR 0027):
        automatic counts the cluster's nodes the server announces (its ``connect_urls``)."""
        info = getattr(self._nc, "_server_info", None) or {}
        nodes = len(set(info.get("connect_urls") or []))
        return cluster.replicas_for(self._replicas, nodes)

    # --- callbacks given to nats-py -----------------------------------------------------------

    async def _on_error(self, e: Exception) -> None:
        text = str(e)
        m = _VIOLATION.search(text)
        if m is not None:
            kind, subject = m.group(1), m.group(2)
            if not self._watch.report(kind, subject, text):
                logger.error("%s: the NATS server refused %s on %s", self._module, kind, subject)
            return
        logger.warning("%s: NATS (%s): %s", self._module, self._url, text or type(e).__name__)

    async def _on_disconnected(self) -> None:
        if not self._closed:
            logger.warning("%s: disconnected from NATS at %s", self._module, self._url)

    async def _on_reconnected(self) -> None:
        logger.info("%s: reconnected to NATS at %s", self._module, self._url)

    # --- helpers ------------------------------------------------------------------------------

    def _unavailable(self, what: str, e: BaseException) -> errors.UnavailableError:
        return errors.UnavailableError(f"{self._module} cannot {what}: NATS at {self._url}: {e}")

    def _check_open(self, *, new_work: bool) -> None:
        if self.is_closed:
            raise errors.UnavailableError(f"the bus connection of {self._module} to {self._url} is closed")
        if new_work and (self._draining or self._nc.is_draining):
            raise errors.UnavailableError(f"the bus connection of {self._module} is draining")

    def _too_large(self, subject: str, size: int) -> errors.TooLargeError:
        return errors.TooLargeError(
            f"message to {subject} is {size} bytes, over the bus limit of {self._nc.max_payload}"
        )

    async def _confirm(self, what: str) -> None:
        """Return once the server processed everything we sent (a refusal has arrived by then).

        Two round trips: nats-py writes PING straight to the socket while a PUB or SUB may still
        wait in its buffer for the flusher task; by the time the first PONG is read the flusher
        has written it, and the server answers the second PING after processing it.
        """
        try:
            await self._nc.flush(timeout=CONFIRM_TIMEOUT)  # type: ignore[arg-type]
            await self._nc.flush(timeout=CONFIRM_TIMEOUT)  # type: ignore[arg-type]
        except (*_UNAVAILABLE, nats.errors.TimeoutError) as e:
            raise self._unavailable(what, e) from e

    # --- Bus ----------------------------------------------------------------------------------

    async def request(self, subject: str, data: bytes, *, timeout: float = 5.0) -> bytes:  # noqa: ASYNC109
        check_subject(subject, wildcards=False)
        self._check_open(new_work=False)
        if len(data) > self._nc.max_payload:
            raise self._too_large(subject, len(data))
        with self._watch.watch("publish", subject) as refused:
            req = asyncio.ensure_future(self._nc.request(subject, bytes(data), timeout=timeout))
            try:
                either: set[asyncio.Future[Any]] = {req, refused}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not req.done():
                    req.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await req
            if refused.done() and not refused.cancelled():
                raise permission_denied(self._module, "publish to", subject)
            try:
                msg = req.result()
            except nats.errors.NoRespondersError:
                raise no_responder_error(subject) from None
            except nats.errors.TimeoutError:
                raise timeout_error(subject, timeout) from None
            except nats.errors.MaxPayloadError:
                raise self._too_large(subject, len(data)) from None
            except (*_UNAVAILABLE, nats.errors.Error) as e:
                raise self._unavailable(f"send a request to {subject}", e) from e
        return decode_reply(msg.headers, bytes(msg.data))

    async def publish(self, subject: str, data: bytes) -> None:
        check_subject(subject, wildcards=False)
        self._check_open(new_work=False)
        if len(data) > self._nc.max_payload:
            raise self._too_large(subject, len(data))
        with self._watch.watch("publish", subject) as refused:
            try:
                await self._nc.publish(subject, bytes(data))
            except nats.errors.MaxPayloadError:
                raise self._too_large(subject, len(data)) from None
            except (*_UNAVAILABLE, nats.errors.Error) as e:
                raise self._unavailable(f"publish to {subject}", e) from e
            if not self._confirm_publish:
                return
            await self._confirm(f"publish to {subject}")
            if refused.done() and not refused.cancelled():
                raise permission_denied(self._module, "publish to", subject)

    async def serve(self, subject: str, handler: RequestHandler, *, queue: str | None = None) -> _NatsSubscription:
        async def on_request(msg: Msg) -> None:
            await self._sem.acquire()
            task = asyncio.get_running_loop().create_task(self._answer(handler, msg))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

        return await self._subscribe(subject, queue, on_request, None)

    async def subscribe(self, subject: str, handler: EventHandler, *, queue: str | None = None) -> _NatsSubscription:
        events = _EventQueue(self, handler)
        try:
            return await self._subscribe(subject, queue, events.put, events)
        except BaseException:
            events.stop()
            raise

    async def _subscribe(
        self,
        subject: str,
        queue: str | None,
        cb: Callable[[Msg], Awaitable[None]],
        events: _EventQueue | None,
    ) -> _NatsSubscription:
        check_subject(subject, wildcards=True)
        if queue is not None:
            check_subject(queue, wildcards=False)
        self._check_open(new_work=True)
        with self._watch.watch("subscription", subject) as refused:
            try:
                sub = await self._nc.subscribe(subject, queue=queue or "", cb=cb)
            except (*_UNAVAILABLE, nats.errors.Error) as e:
                raise self._unavailable(f"subscribe to {subject}", e) from e
            try:
                await self._confirm(f"subscribe to {subject}")
                if refused.done() and not refused.cancelled():
                    raise permission_denied(self._module, "subscribe to", subject)
            except BaseException:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
                raise
        handle = _NatsSubscription(self, sub, events)
        self._subs.append(handle)
        return handle

    async def _unsubscribe(self, handle: _NatsSubscription) -> None:
        with contextlib.suppress(ValueError):
            self._subs.remove(handle)
        if handle._events is not None:
            handle._events.stop()
        if self.is_closed:
            return
        try:
            await handle._sub.unsubscribe()
            # once this returns the server routes nothing more to it (no responder, not a timeout)
            await self._confirm(f"unsubscribe from {handle._sub.subject}")
        except nats.errors.BadSubscriptionError:
            pass  # already gone
        except (*_UNAVAILABLE, nats.errors.Error, errors.UnavailableError) as e:
            logger.warning("%s: unsubscribe from %s: %s", self._module, handle._sub.subject, e)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._sem.release()

    # --- key-value (JetStream) ----------------------------------------------------------------

    async def key_value(self, bucket: str, *, create: bool = False) -> NatsKeyValue:
        check_bucket(bucket)
        self._check_open(new_work=False)
        js = self._js_context()
        stream = subjects.kv_stream(bucket)

        async def open_bucket() -> _NatsKV:
            try:
                return await js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                if not create:
                    raise
            # one value per key, on disk (the mode must survive a restart of the server)
            config = KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE, replicas=self.replicas())
            return await js.create_key_value(config)

        kv = await self._jetstream(
            f"open bucket {bucket}",
            open_bucket(),
            [f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.CREATE.{stream}"],
        )
        return NatsKeyValue(self, kv, bucket)

    # --- append-only streams (JetStream) -------------------------------------------------------

    def _js_context(self) -> JetStreamContext:
        if self._js is None:
            self._js = self._nc.jetstream(timeout=CONFIRM_TIMEOUT)
        return self._js

    async def append_only_stream(self, name: str, subject: str, *, create: bool = False) -> NatsStream:
        check_bucket(name)
        check_subject(subject, wildcards=False)
        self._check_open(new_work=False)
        stream = NatsStream(self, name, subject, replicas=self.replicas())
        if create:
            api = [f"$JS.API.STREAM.INFO.{name}", f"$JS.API.STREAM.CREATE.{name}"]
            await self._jetstream(f"create stream {name}", stream.create(), api)
        return stream

    async def _jetstream(self, what: str, op: Awaitable[_T], refusable: Sequence[str]) -> _T:
        """Run a JetStream call, raising at once if the server refuses a publish it makes to a
        subject starting with one of ``refusable`` (it would otherwise only time out)."""
        with self._watch.watch_prefixes("publish", refusable) as refused:
            task = asyncio.ensure_future(op)
            try:
                either: set[asyncio.Future[Any]] = {task, refused}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            if refused.done() and not refused.cancelled():
                raise permission_denied(self._module, f"{what} through", refused.result())
            try:
                return task.result()
            except nats.js.errors.NotFoundError as e:
                raise errors.NotFoundError(f"{what}: not found ({e.description or 'no such bucket'})") from e
            except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError) as e:
                raise errors.UnavailableError(
                    f"{self._module} cannot {what}: JetStream does not answer at {self._url} (is it enabled?)"
                ) from e
            except (*_UNAVAILABLE, nats.errors.Error) as e:
                raise self._unavailable(what, e) from e

    async def _answer(self, handler: RequestHandler, msg: Msg) -> None:
        headers, body = await call_handler(handler, _to_message(msg), module=self._module, log=logger)
        if not msg.reply:
            return  # published, not requested: nobody to answer
        try:
            try:
                await self._nc.publish(msg.reply, body, headers=headers)
            except nats.errors.MaxPayloadError:
                headers, body = encode_error(
                    errors.TooLargeError(f"the reply on {msg.subject} is over the bus limit of {self._nc.max_payload}")
                )
                await self._nc.publish(msg.reply, body, headers=headers)
        except (*_UNAVAILABLE, nats.errors.Error) as e:
            logger.warning("%s: could not reply on %s: %s", self._module, msg.subject, e)

    async def drain(self) -> None:
        """Stop taking new requests and events, finish the ones received, then close.

        In-flight handlers keep a working connection (they can still reply and make requests)
        until they finish or ``drain_timeout`` runs out, when they are cancelled.
        """
        if self._closed or self._draining:
            return
        self._draining = True
        subs = list(self._subs)

        async def finish() -> None:
            # 1. the server stops sending; what it already sent is handed to our handlers
            async def drain_sub(handle: _NatsSubscription) -> None:
                try:
                    await handle._sub.drain()  # type: ignore[no-untyped-call]
                except (*_UNAVAILABLE, nats.errors.Error) as e:
                    logger.warning("%s: drain of %s: %s", self._module, handle._sub.subject, e)

            await asyncio.gather(*(drain_sub(h) for h in subs))
            # 2. queued events and in-flight request handlers finish
            for handle in subs:
                if handle._events is not None:
                    await handle._events.queue.join()
            while self._tasks:
                await asyncio.wait(set(self._tasks))

        try:
            await asyncio.wait_for(finish(), self._drain_timeout)
        except TimeoutError:
            logger.warning("%s: drain timed out after %g s; cancelling what is left", self._module, self._drain_timeout)
        # 3. flush what we published and close
        if not self._nc.is_closed and self._nc.is_connected:
            try:
                await self._nc.drain()
            except (*_UNAVAILABLE, nats.errors.Error) as e:
                logger.warning("%s: drain of the NATS connection: %s", self._module, e)
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in list(self._kv_watches):
            await w.unsubscribe()
        current = asyncio.current_task()
        pending: list[asyncio.Task[None]] = []
        for handle in self._subs:
            if handle._events is not None:
                handle._events.active = False
                if handle._events.worker is not current:
                    handle._events.worker.cancel()
                    pending.append(handle._events.worker)
        self._subs.clear()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
                pending.append(task)
        # Bounded: closing must never hang its caller (a supervisor stopping, a test tearing down);
        # a handler that ignores its cancellation is logged and left behind.
        await cancel_and_wait(pending, within=_CLOSE_TIMEOUT, what=f"{self._module}'s handlers")
        if not self._nc.is_closed:
            try:
                await asyncio.wait_for(self._nc.close(), _CLOSE_TIMEOUT)
            except TimeoutError:
                logger.warning("%s: the NATS connection did not close within %g s", self._module, _CLOSE_TIMEOUT)
            except Exception as e:  # closing: nothing left to tell the caller
                logger.debug("%s: close: %s", self._module, e)


def _check_transport(
    url: str, *, module: str, tls: ssl.SSLContext | None, allow_plain: bool, tls_handshake_first: bool
) -> bool:
    """Whether ``module`` connects to ``url`` over TLS; refuses plain NATS to a host that is not
    loopback unless ``allow_plain`` (:mod:`iotdlm.bus.urls`) and logs a warning for each setting
    that weakens the connection."""
    if urls.check_nats_url(url, allow_plain=allow_plain):
        logger.warning(
            "%s connects to NATS at %s WITHOUT TLS ([nats] allow_plain = true): passwords and requests "
            "cross the network in clear",
            module,
            url,
        )
    scheme, _ = urls.nats_host(url)
    over_tls = scheme == "tls" or (tls is not None and scheme == "nats")
    if over_tls and not tls_handshake_first:
        logger.warning(
            "%s connects to NATS at %s without TLS handshake first ([nats] tls_handshake_first = false): "
            "an active attacker answering as the server could strip TLS",
            module,
            url,
        )
    return over_tls


async def _connect_failed(
    e: Exception, client: Client, *, module: str, url: str, user: str | None, close_within: float
) -> errors.UnavailableError:
    """The error to raise for a first connection that failed with ``e``, in the operator's words,
    once the half-made connection is closed."""
    # After a failed TLS handshake asyncio has closed the socket already, and nats-py's close()
    # would wait forever for a stream that never reports it; otherwise close it, with a bound as a
    # safety net.
    if not isinstance(e, ssl.SSLError):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), timeout=max(1.0, close_within))
    detail = str(e) or type(e).__name__
    hint = "is nats-server running there, and are the user, password and TLS settings right?"
    if isinstance(e, nats.errors.Error) and "authorization" in detail.lower():
        hint = f"the server refused the credentials of user {user or '(none)'!r}"
    return errors.UnavailableError(f"cannot connect {module} to NATS at {url}: {detail}; {hint}")


async def connect(
    url: str,
    *,
    module: str,
    user: str | None = None,
    password: str | None = None,
    tls: ssl.SSLContext | None = None,
    name: str | None = None,
    connect_timeout: float = 5.0,
    max_concurrent_handlers: int = DEFAULT_MAX_CONCURRENT_HANDLERS,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    confirm_publish: bool = True,
    jetstream_replicas: int = 0,
    max_reconnect_attempts: int = -1,
    reconnect_time_wait: float = 2.0,
    allow_plain: bool = False,
    tls_handshake_first: bool = True,
) -> NatsBus:
    """Connect ``module`` to the NATS server at ``url`` (``nats://`` or ``tls://``), or to a cluster:
    several URLs separated by commas (:func:`iotdlm.bus.cluster.server_urls`), each checked alike.

    Over TLS (a ``tls://`` URL or a ``tls`` context) the client starts with the TLS handshake
    (``tls_handshake_first``, the default) and reads nothing in plain text: nats-py otherwise
    upgrades only when the server's plain INFO asks for it, so an active attacker answering as the
    server could strip TLS and read the password. The server must expect it (the embedded one
    does: ``handshake_first`` in its tls block); ``tls_handshake_first=False`` is for an external
    server without that setting (``[nats] tls_handshake_first = false``; a warning is logged).

    Plain ``nats://`` is refused (:class:`~iotdlm.errors.BadRequestError`, before any connection)
    unless the host is loopback or ``allow_plain`` (then a warning is logged): see
    :mod:`iotdlm.bus.urls`.

    The first connection is tried once (no retry loop), so a wrong URL, password or TLS setting
    fails fast with :class:`~iotdlm.errors.UnavailableError`. Once connected, the client
    reconnects after a loss (forever by default, ``max_reconnect_attempts=-1``); requests made
    meanwhile time out into :class:`~iotdlm.errors.UnavailableError`.
    """
    servers = cluster.server_urls(url)
    transports = {
        _check_transport(u, module=module, tls=tls, allow_plain=allow_plain, tls_handshake_first=tls_handshake_first)
        for u in servers
    }
    if len(transports) > 1:
        raise errors.BadRequestError(f"the NATS URLs {url!r} mix TLS and plain servers: use tls:// for every node")
    over_tls = transports.pop()
    client = Client()
    bus = NatsBus(
        client,
        module=module,
        url=url,
        max_concurrent_handlers=max_concurrent_handlers,
        drain_timeout=drain_timeout,
        confirm_publish=confirm_publish,
        jetstream_replicas=jetstream_replicas,
    )
    try:
        await client.connect(
            servers=servers,
            error_cb=bus._on_error,
            disconnected_cb=bus._on_disconnected,
            reconnected_cb=bus._on_reconnected,
            name=name or f"iotdlm-{module}",
            user=user,
            password=password,
            tls=tls,
            tls_handshake_first=over_tls and tls_handshake_first,
            connect_timeout=connect_timeout,  # type: ignore[arg-type]
            inbox_prefix=subjects.inbox_prefix(module),
            # one attempt at first: nats-py would otherwise retry for minutes before failing
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0,
            drain_timeout=int(max(1.0, drain_timeout)),
        )
    except (OSError, TimeoutError, nats.errors.Error) as e:
        raise await _connect_failed(e, client, module=module, url=url, user=user, close_within=connect_timeout) from e
    client.options["allow_reconnect"] = True
    client.options["max_reconnect_attempts"] = max_reconnect_attempts
    client.options["reconnect_time_wait"] = reconnect_time_wait
    return bus
