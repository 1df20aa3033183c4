"""The bus's key-value buckets over NATS JetStream (nats-py): :class:`iotdlm.bus.api.KeyValue` and
its watches. Errors map as in :mod:`iotdlm.bus.nats`, whose :class:`~iotdlm.bus.nats.NatsBus` opens
the buckets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import nats.js.errors
from nats.js.kv import KV_DEL, KV_PURGE
from nats.js.kv import KeyValue as _NatsKV

from iotdlm.bus import subjects
from iotdlm.bus.api import KeyValueEntry, KeyValueHandler
from iotdlm.bus.memory import check_key

if TYPE_CHECKING:
    from iotdlm.bus.nats import NatsBus

logger = logging.getLogger(__name__)


class NatsKeyValue:
    """:class:`iotdlm.bus.api.KeyValue` over a JetStream key-value bucket (nats-py)."""

    def __init__(self, bus: NatsBus, kv: _NatsKV, bucket: str) -> None:
        self._bus = bus
        self._kv = kv
        self._bucket = bucket
        self._stream = subjects.kv_stream(bucket)

    @property
    def bucket(self) -> str:
        return self._bucket

    def _read_api(self) -> list[str]:
        return [f"$JS.API.DIRECT.GET.{self._stream}", f"$JS.API.STREAM.MSG.GET.{self._stream}"]

    async def get(self, key: str) -> KeyValueEntry | None:
        check_key(key)
        self._bus._check_open(new_work=False)

        async def get() -> KeyValueEntry | None:
            try:
                e = await self._kv.get(key)
            except nats.js.errors.KeyNotFoundError:  # never written, deleted, or purged
                return None
            return KeyValueEntry(key=key, value=bytes(e.value or b""), revision=int(e.revision or 0))

        return await self._bus._jetstream(f"read {self._bucket}/{key}", get(), self._read_api())

    async def put(self, key: str, value: bytes) -> int:
        check_key(key)
        self._bus._check_open(new_work=False)
        subject = subjects.kv_subject(self._bucket, key)
        if len(value) > self._bus.max_payload:
            raise self._bus._too_large(subject, len(value))
        revision = await self._bus._jetstream(f"write {self._bucket}/{key}", self._kv.put(key, bytes(value)), [subject])
        return int(revision)

    async def delete(self, key: str) -> None:
        check_key(key)
        self._bus._check_open(new_work=False)
        subject = subjects.kv_subject(self._bucket, key)
        await self._bus._jetstream(f"delete {self._bucket}/{key}", self._kv.delete(key), [subject])

    async def watch(self, key: str, handler: KeyValueHandler) -> NatsWatch:
        check_key(key)
        self._bus._check_open(new_work=True)
        watcher = await self._bus._jetstream(
            f"watch {self._bucket}/{key}",
            self._kv.watch(key),
            ["$JS.API.CONSUMER.", f"$JS.FC.{self._stream}"],
        )
        w = NatsWatch(self._bus, watcher, handler, f"{self._bucket}/{key}")
        self._bus._kv_watches.add(w)
        return w


class NatsWatch:
    """Feeds a nats-py key watcher's updates to a handler, one at a time, in order."""

    def __init__(self, bus: NatsBus, watcher: _NatsKV.KeyWatcher, handler: KeyValueHandler, name: str) -> None:
        self._bus = bus
        self._watcher = watcher
        self._handler = handler
        self._name = name
        self.worker = asyncio.get_running_loop().create_task(self._run(), name=f"nats-kv-{name}")

    async def _run(self) -> None:
        seen = False
        async for e in self._watcher:
            if e is None:  # nats-py's "initial values done" marker; alone, it means "no value"
                if not seen:
                    await self._call(None)
                seen = True
                continue
            seen = True
            if e.operation in (KV_DEL, KV_PURGE):
                await self._call(None)
            else:
                await self._call(KeyValueEntry(key=e.key, value=bytes(e.value or b""), revision=int(e.revision or 0)))

    async def _call(self, entry: KeyValueEntry | None) -> None:
        try:
            await self._handler(entry)
        except Exception:
            logger.exception("%s: watch handler for %s failed", self._bus.module, self._name)

    async def unsubscribe(self) -> None:
        self._bus._kv_watches.discard(self)
        with contextlib.suppress(Exception):
            await self._watcher.stop()  # type: ignore[no-untyped-call]
        if self.worker is not asyncio.current_task():
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)
