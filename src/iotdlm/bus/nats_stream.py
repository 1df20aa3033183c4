"""Append-only streams over NATS JetStream (nats-py): :class:`iotdlm.bus.api.AppendOnlyStream`, the
audit log's third anchor (docs/adr/0005-audit-anchors.md). Errors map as in :mod:`iotdlm.bus.nats`,
whose :class:`~iotdlm.bus.nats.NatsBus` opens the streams."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from iotdlm import errors
from iotdlm.bus.api import StreamEntry

if TYPE_CHECKING:
    from iotdlm.bus.nats import NatsBus

#: how many message gets one read of a stream has in flight at once
_READ_WINDOW = 64


class NatsStream:
    """:class:`iotdlm.bus.api.AppendOnlyStream` as a JetStream stream (see :meth:`config`)."""

    def __init__(self, bus: NatsBus, name: str, subject: str, *, replicas: int = 1) -> None:
        self._bus = bus
        self._replicas = replicas
        self._name = name
        self._subject = subject

    @property
    def name(self) -> str:
        return self._name

    def config(self) -> StreamConfig:
        """Keeps everything, for good: no age, size or count limit, on disk; deleting a message
        and purging are refused by the server (and nobody may update the stream to allow them)."""
        return StreamConfig(
            name=self._name,
            subjects=[self._subject],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=0,
            deny_delete=True,
            deny_purge=True,
            allow_direct=True,
            num_replicas=self._replicas,
        )

    async def create(self) -> None:
        js = self._bus._js_context()
        try:
            info = await js.stream_info(self._name)
        except nats.js.errors.NotFoundError:
            await js.add_stream(self.config())
            return
        cfg = info.config
        weak = [
            what
            for what, bad in (
                ("message delete is allowed", not cfg.deny_delete),
                ("purge is allowed", not cfg.deny_purge),
                (f"messages expire after {cfg.max_age} s", bool(cfg.max_age)),
                (f"it captures {cfg.subjects}, not {self._subject}", list(cfg.subjects or []) != [self._subject]),
                ("it is kept in memory", cfg.storage != StorageType.FILE),
                ("it has a size or count limit", (cfg.max_msgs or -1) > 0 or (cfg.max_bytes or -1) > 0),
            )
            if bad
        ]
        if weak:
            raise errors.ConflictError(f"stream {self._name} exists but is not append-only: {'; '.join(weak)}")

    async def append(self, data: bytes) -> int:
        js = self._bus._js_context()
        self._bus._check_open(new_work=False)

        async def publish() -> int:
            try:
                ack = await js.publish(self._subject, bytes(data), stream=self._name)
            except nats.errors.NoRespondersError:
                raise errors.NotFoundError(
                    f"append to stream {self._name}: no stream captures {self._subject} "
                    "(has the supervisor created it?)"
                ) from None
            return int(ack.seq)

        return await self._bus._jetstream(f"append to stream {self._name}", publish(), [self._subject])

    async def read(self) -> list[StreamEntry]:
        js = self._bus._js_context()
        self._bus._check_open(new_work=False)

        async def get(seq: int) -> StreamEntry | None:
            try:
                raw = await js.get_msg(self._name, seq=seq)
            except nats.js.errors.NotFoundError:
                return None  # cannot happen with deny_delete; tolerated all the same
            return StreamEntry(seq=seq, data=bytes(raw.data or b""))

        async def read_all() -> list[StreamEntry]:
            state = (await js.stream_info(self._name)).state
            if not state.messages:
                return []
            out: list[StreamEntry] = []
            seqs = list(range(state.first_seq, state.last_seq + 1))
            for i in range(0, len(seqs), _READ_WINDOW):
                got = await asyncio.gather(*(get(n) for n in seqs[i : i + _READ_WINDOW]))
                out.extend(e for e in got if e is not None)
            return out

        api = [f"$JS.API.STREAM.INFO.{self._name}", f"$JS.API.STREAM.MSG.GET.{self._name}"]
        return await self._bus._jetstream(f"read stream {self._name}", read_all(), api)
