"""pm's alarm: Algorithm 1 failed, pm is HALTED until an operator clears it (paper 4.2, Scenario 1).

The alarm of a dtype is persisted in the store (meta key ``pm.alarm.<dtype>``) together with its
audit record (kind ``alarm``, naming the failed check: meta_enc, sig_sm, meta_repo or image), and
published on ``iotdlm.v1.events.pm.alarm``. It survives restarts: :func:`read_alarm` finds it,
:func:`clear_alarm` (an operator, audited) lifts it. :class:`PmAlarm` is the alarm of one running
pm: an alarm the store could not record keeps that process halted all the same.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Final

from iotdlm import errors
from iotdlm.bus import Bus
from iotdlm.bus import subjects as s
from iotdlm.clock import Clock
from iotdlm.pm.settings import check_operator
from iotdlm.pm.storage import PmStore
from iotdlm.pm.workers import Workers
from iotdlm.store import AuditEntry
from iotdlm.wire import audit as fmt
from iotdlm.wire import pm as m
from iotdlm.wire import software as sw

log = logging.getLogger(__name__)

ALARM_KEY_PREFIX: Final = "pm.alarm."


def alarm_key(dtype: str) -> str:
    return ALARM_KEY_PREFIX + dtype


def alarm_subject() -> str:
    return s.events("pm", "alarm")


class HaltedError(errors.ConflictError):
    """pm is halted by an alarm (Algorithm 1 failed); ``field`` names the failed check.

    A ConflictError (pm's state forbids the request) with its own wire code, ``halted``, so
    :func:`iotdlm.errors.from_wire` rebuilds it as itself wherever this module is imported (and
    never shadows ConflictError)."""

    code = "halted"


def read_alarm(store: PmStore, dtype: str) -> m.Alarm | None:
    """The last alarm of ``dtype`` (raised or cleared), or None if there never was one."""
    raw = store.get_meta(alarm_key(dtype))
    if raw is None:
        return None
    try:
        return m.decode(raw.encode(), m.Alarm, what="stored alarm")
    except errors.BadRequestError:
        # an unreadable alarm is still an alarm: stay halted until an operator clears it
        return m.Alarm(
            dtype=dtype,
            check="unknown",
            code="internal",
            message=f"the stored alarm of {dtype} cannot be read: {raw[:200]!r}",
            raised_at="unknown",
            raised_by="unknown",
        )


def clear_alarm(store: PmStore, dtype: str, operator: str, now: dt.datetime) -> m.Alarm:
    """An operator clears the alarm of ``dtype`` (audited); pm works again. NotFoundError when no
    alarm is raised."""
    operator = check_operator(operator)
    current = read_alarm(store, dtype)
    if current is None or not current.active:
        raise errors.NotFoundError(f"pm-{dtype} has no alarm raised; nothing to clear", field="alarm")
    cleared = m.Alarm(
        dtype=current.dtype,
        check=current.check,
        code=current.code,
        message=current.message,
        raised_at=current.raised_at,
        raised_by=current.raised_by,
        release_counter=current.release_counter,
        state="cleared",
        cleared_by=operator,
        cleared_at=sw.iso(now),
    )
    entry = AuditEntry(
        at=now,
        kind=fmt.ALARM,
        actor=operator,
        subject=f"pm-{dtype}",
        data={
            "action": "cleared",
            "dtype": dtype,
            "check": current.check,
            "raised_at": current.raised_at,
            "operator": operator,
        },
    )
    store.set_meta_with_audit(alarm_key(dtype), m.encode(cleared).decode(), [entry])
    return cleared


def halted_error(alarm: m.Alarm) -> HaltedError:
    """The error a halted pm answers with: what failed, and what the operator does about it."""
    return HaltedError(
        f"pm-{alarm.dtype} is halted by an alarm raised at {alarm.raised_at}: Algorithm 1 failed at "
        f"{alarm.check} ({alarm.message}). Nothing is flashed until an operator has investigated sm's "
        f"local repository and runs `iotdlm pm clear-alarm --dtype {alarm.dtype} --operator NAME`",
        field=alarm.check,
    )


class PmAlarm:
    """The alarm of one running pm (dtype): raised when Algorithm 1 fails, read before each run,
    cleared by an operator. An alarm this process could not record keeps it halted, and is
    recorded as soon as the store is back."""

    def __init__(self, dtype: str, *, store: PmStore, bus: Bus, clock: Clock, workers: Workers) -> None:
        self.dtype = dtype
        self.store = store
        self.bus = bus
        self.clock = clock
        self.workers = workers
        self.actor = f"pm[{dtype}]"
        #: an alarm raised while the store could not record it: this process stays halted anyway
        self._unrecorded: tuple[m.Alarm, AuditEntry] | None = None

    async def _record(self, alarm: m.Alarm, entry: AuditEntry) -> None:
        """The alarm and its audit record, in one store transaction."""
        await self.workers.run(self.store.set_meta_with_audit, alarm_key(self.dtype), m.encode(alarm).decode(), [entry])

    async def active(self) -> m.Alarm | None:
        """The active alarm, or None. An alarm this process could not record keeps it halted."""
        if self._unrecorded is not None:
            alarm, entry = self._unrecorded
            try:
                await self._record(alarm, entry)
                self._unrecorded = None
            except errors.UnavailableError as exc:
                log.error("pm-%s: the alarm is still not recorded in the store: %s", self.dtype, exc)
            return alarm
        found = await self.workers.run(read_alarm, self.store, self.dtype)
        return found if found is not None and found.active else None

    async def last(self) -> m.Alarm | None:
        """The last alarm (raised or cleared) for pm's status; None if there never was one."""
        alarm = await self.workers.run(read_alarm, self.store, self.dtype)
        if self._unrecorded is not None:
            alarm = self._unrecorded[0]
        return alarm

    async def clear(self, operator: str) -> m.Alarm:
        """Clear the alarm (audited): :func:`clear_alarm` on this pm's store."""
        self._unrecorded = None
        return await self.workers.run(clear_alarm, self.store, self.dtype, operator, self.clock.now())

    async def raise_alarm(
        self, exc: errors.RejectedError, check: str, release_counter: int | None, operator: str
    ) -> HaltedError:
        """HALT: record the alarm with its audit record, publish it; the error to raise."""
        now = self.clock.now()
        alarm = m.Alarm(
            dtype=self.dtype,
            check=check,
            code=exc.code,
            message=exc.message[:1000],
            raised_at=sw.iso(now),
            raised_by=operator,
            release_counter=release_counter,
        )
        entry = AuditEntry(
            at=now,
            kind=fmt.ALARM,
            actor=self.actor,
            subject=f"pm-{self.dtype}",
            data={
                "action": "raised",
                "dtype": self.dtype,
                "check": check,
                "code": exc.code,
                "message": exc.message[:1000],
                "release_counter": release_counter,
                "operator": operator,
            },
        )
        log.critical("pm-%s HALTED: Algorithm 1 failed at %s: %s", self.dtype, check, exc.message)
        try:
            await self._record(alarm, entry)
        except errors.IotdlmError as store_exc:
            log.error("pm-%s: cannot record the alarm in the store (%s); halted in this process", self.dtype, store_exc)
            self._unrecorded = (alarm, entry)
        try:
            await self.bus.publish(alarm_subject(), m.encode(alarm))
        except errors.IotdlmError as bus_exc:
            log.error("pm-%s: cannot publish the alarm event: %s", self.dtype, bus_exc)
        return halted_error(alarm)
