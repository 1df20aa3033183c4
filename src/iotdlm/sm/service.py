"""sm on the bus: pm's API to the local repository, the poll schedule, repository notifications.

- ``SM_SOFTWARE_LIST`` {"dtype"} -> the stored versions (info.json of each), ascending;
- ``SM_SOFTWARE_LOAD`` {"dtype", "release_counter"?} -> image path (pm and sm share the local
  repository folder: images are too big for the bus), meta.enc and sig_sm;
- ``SM_SOFTWARE_HELD`` {"dtype"?} -> every release held, each verified again (read-only; the
  operator's console asks it: :mod:`iotdlm.sm.held`);
- ``SM_NOTIFY`` {"dtype"} (cm relays the repository's webhook): check that dtype now;
- every ``poll_interval`` seconds, per dtype: check. A check that could not reach the repository
  (cm's egress proxy not up yet, the repository down) is tried again soon: after ``retry_after``
  seconds, doubling each time up to the poll interval.

A check runs in a worker thread (the event loop keeps answering pm meanwhile). Its outcome is
published on ``iotdlm.v1.events.sm.<kind>``: ``stored`` (a new release), ``checked`` (nothing new;
``release_counter`` is the repository's latest, if any), ``refused`` (a RejectedError: rollback,
expired or wrongly signed metadata, wrong hardware_id, altered image -- the paper's alarm),
``failed`` (the repository could not be reached).

Defence in depth (Table 1, issue 11): given a :class:`~iotdlm.modes.guard.ModeGuard`, sm checks the
operation mode itself, like km, pm and cm. It answers pm only where sm runs (provisioning-software,
software-management) and reaches the repository only in software-management (the one mode where
cm relays its egress); outside them a request is refused with ``wrong_mode`` and a check publishes
a ``refused`` event (code ``wrong_mode``) instead of contacting the repository.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from iotdlm.aio import stop_serving
from iotdlm.bus import Bus, Message, Subscription
from iotdlm.bus import subjects as s
from iotdlm.errors import IotdlmError, RejectedError
from iotdlm.modes.guard import ModeGuard
from iotdlm.modes.table import Mode, modes_where
from iotdlm.sm.held import held
from iotdlm.sm.updater import CheckResult, SoftwareManager
from iotdlm.wire import software as sw

log = logging.getLogger(__name__)

#: the repository announced a release (to be added to iotdlm.bus.subjects as SM_NOTIFY)
SM_NOTIFY = f"{s.SM_PREFIX}.notify"


#: where sm answers pm (Table 1: sm runs there)
SERVE_MODES = modes_where("sm")
#: where sm reaches the repository (cm relays sm's egress only there)
CHECK_MODES = frozenset({Mode.SOFTWARE_MANAGEMENT})


def event_subject(kind: str) -> str:
    return s.events("sm", kind)


class SmService:
    def __init__(
        self,
        sm: SoftwareManager,
        bus: Bus,
        *,
        dtypes: list[str],
        poll_interval: float | None = 3600.0,
        guard: ModeGuard | None = None,
        retry_after: float = 5.0,
    ) -> None:
        """``guard`` (started and stopped with the service) checks the operation mode before
        every request and check; ``None``: no mode check (tests of sm alone)."""
        self.sm = sm
        self.guard = guard
        self.bus = bus
        self.dtypes = [sw.check_dtype(d) for d in dtypes]
        self.poll_interval = poll_interval
        self.retry_after = retry_after
        self._subs: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: dict[str, asyncio.Event] = {}

    async def start(self) -> None:
        if self.guard is not None:
            await self.guard.start()
        queue = s.queue_group("sm")
        self._subs.append(await self.bus.serve(s.SM_SOFTWARE_LIST, self._list, queue=queue))
        self._subs.append(await self.bus.serve(s.SM_SOFTWARE_LOAD, self._load, queue=queue))
        self._subs.append(await self.bus.serve(s.SM_SOFTWARE_HELD, self._held, queue=queue))
        self._subs.append(await self.bus.subscribe(SM_NOTIFY, self._notify, queue=queue))
        for dtype in self.dtypes:
            self._wake[dtype] = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._poll(dtype), name=f"sm-poll-{dtype}"))
        log.info("sm serving; managing %s", ", ".join(self.dtypes) or "no dtype")

    # --- pm's API ---------------------------------------------------------------------------------
    def _require(self, allowed: frozenset[Mode], what: str) -> None:
        if self.guard is not None:
            self.guard.require(allowed, what)

    async def _list(self, m: Message) -> bytes:
        self._require(SERVE_MODES, "listing stored software")
        req = sw.decode(m.data, sw.ListRequest)
        versions = await asyncio.to_thread(self.sm.list, req.dtype)
        return sw.encode(sw.ListResponse(versions=versions))

    async def _load(self, m: Message) -> bytes:
        self._require(SERVE_MODES, "loading stored software")
        req = sw.decode(m.data, sw.LoadRequest)
        return sw.encode(await asyncio.to_thread(self.sm.load, req.dtype, req.release_counter))

    async def _held(self, m: Message) -> bytes:
        self._require(SERVE_MODES, "listing held software")
        req = sw.decode(m.data or b"{}", sw.HeldRequest)
        return sw.encode(await asyncio.to_thread(held, self.sm, req.dtype))

    # --- checks -------------------------------------------------------------------------------------
    async def _notify(self, m: Message) -> None:
        try:
            note = sw.decode(m.data, sw.NotifyMessage, what="notification")
        except IotdlmError as exc:
            log.warning("ignoring a malformed notification: %s", exc)
            return
        wake = self._wake.get(note.dtype)
        if wake is None:
            log.info("notification for %s, which this sm does not manage: ignored", note.dtype)
            return
        wake.set()

    def trigger(self, dtype: str) -> None:
        """Check ``dtype`` now (as a notification does)."""
        self._wake[dtype].set()

    async def _poll(self, dtype: str) -> None:
        wake = self._wake[dtype]
        retry = self.retry_after
        while True:
            wake.clear()
            _result, unreachable = await self._check(dtype)
            delay = self.poll_interval
            if unreachable:
                delay = retry if delay is None else min(retry, delay)
                retry = min(retry * 2, self.poll_interval or retry * 2)
                log.info("sm checks %s again in %.0f s", dtype, delay)
            else:
                retry = self.retry_after
            if delay is None:
                await wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), delay)

    async def check(self, dtype: str) -> CheckResult | None:
        """One check of ``dtype``; its outcome becomes an event, never an exception."""
        return (await self._check(dtype))[0]

    async def _check(self, dtype: str) -> tuple[CheckResult | None, bool]:
        """The check's result, and whether the repository could not be reached."""
        try:
            self._require(CHECK_MODES, f"checking the repository for {dtype}")
            result = await asyncio.to_thread(self.sm.check, dtype)
        except RejectedError as exc:
            log.error("sm refused %s: %s", dtype, exc)
            await self._event(
                sw.SmEvent(kind="refused", dtype=dtype, code=exc.code, message=exc.message, field=exc.field)
            )
            return None, False
        except IotdlmError as exc:
            log.warning("sm check of %s failed: %s", dtype, exc)
            await self._event(sw.SmEvent(kind="failed", dtype=dtype, code=exc.code, message=exc.message))
            return None, True
        if result.stored is not None:
            await self._event(sw.SmEvent(kind="stored", dtype=dtype, release_counter=result.stored.release_counter))
        else:
            await self._event(sw.SmEvent(kind="checked", dtype=dtype, release_counter=result.latest))
        return result, False

    async def _event(self, event: sw.SmEvent) -> None:
        try:
            await self.bus.publish(event_subject(event.kind), sw.encode(event))
        except IotdlmError as exc:
            log.warning("could not publish sm event %s: %s", event.kind, exc)

    async def stop(self) -> None:
        await stop_serving(self._tasks, self._subs, what="sm tasks")
        guard, self.guard = self.guard, None
        if guard is not None:
            await guard.stop()
