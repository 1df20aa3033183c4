"""km on the bus: thin handlers (decode -> authorize -> act -> encode) around :class:`Km`.

Every worker joins the ``iotdlm.km`` queue group, so N km processes share the subjects; the work
of one request runs in a worker thread, so the event loop keeps moving NATS traffic meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from iotdlm.bus import Bus, Message, Subscription
from iotdlm.bus import subjects as s
from iotdlm.km.core import Km
from iotdlm.wire import km as msg

log = logging.getLogger(__name__)


class KmService:
    def __init__(self, km: Km, bus: Bus) -> None:
        self.km = km
        self.bus = bus
        self._subs: list[Subscription] = []

    async def start(self) -> None:
        queue = s.queue_group("km")
        routes: dict[str, Callable[[Message], Any]] = {
            s.KM_ISSUE: lambda m: self.km.issue(m.data),
            s.KM_ISSUE_BATCH: lambda m: self.km.issue_batch(m.data),
            s.KM_RENEW: lambda m: self.km.renew(m.data),
            s.KM_CHAIN: lambda m: self.km.chain(),
            s.KM_GET: lambda m: self.km.get(msg.decode(m.data, msg.GetRequest)),
        }
        for subject, fn in routes.items():
            self._subs.append(await self.bus.serve(subject, self._wrap(fn), queue=queue))
        log.info("km serving %d subjects", len(routes))

    @staticmethod
    def _wrap(fn: Callable[[Message], Any]) -> Callable[[Message], Any]:
        async def handler(m: Message) -> bytes:
            result = await asyncio.to_thread(fn, m)
            return msg.encode(result)

        return handler

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()
