"""Defence in depth: services check the operation mode themselves.

The supervisor turns modules on and off (Table 1); a service that is running anyway -- started by
hand, left over, or in a mode where it runs for another reason -- still refuses work its mode
forbids. :class:`ModeGuard` keeps the current mode (a watch on the ``iotdlm_mode`` bucket, and a
read every ``refresh_every`` seconds that heals a lost watch) and :meth:`ModeGuard.require` raises
:class:`~iotdlm.errors.ModeError` when the mode is not one of those allowed -- or is unknown:
never published, or not confirmed for ``max_age`` seconds. Deny by default.

The record must be signed by the supervisor (:mod:`iotdlm.modes.signed`, issue 11): a value the
guard's :class:`~iotdlm.modes.signed.ModeVerifier` cannot verify -- unsigned, signed by another
module, tampered with -- is no valid mode (the service refuses work) and an alarm: logged, and
published once per bucket revision on ``iotdlm.v1.events.<module>.mode_alarm``, which the
supervisor writes to the audit log. Alarms are rate-limited (:class:`AlarmLimiter`): whoever can
write the bucket could otherwise flood the log and the audit log with forged revisions; the same
reason is reported at most once per ``alarm_every`` seconds, and the next report counts the ones
held back.

km::

    guard = ModeGuard(bus, ModeVerifier.for_deployment(dep))
    await guard.start()
    ...
    guard.require(DEVICE_CERTIFICATE_MODES, "issuing a device certificate for pm")   # sync: fine in a thread

pm (refuses while cm, the door to the outside, runs)::

    guard.require(modes_where("pm"), "provisioning")
    await guard.require_cm_off("provisioning")
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Set
from types import TracebackType

from iotdlm import errors
from iotdlm.bus import subjects
from iotdlm.bus.api import Bus, KeyValue, KeyValueEntry, Subscription
from iotdlm.client import revocation
from iotdlm.modes.signed import ModeVerifier
from iotdlm.pki.revocation import RevokedSignerError
from iotdlm.wire.modes import ModeAlarm, ModeRecord, encode

log = logging.getLogger(__name__)


async def cm_running(bus: Bus, *, timeout: float = 1.0) -> bool:  # noqa: ASYNC109
    """Whether a cm answers ``iotdlm.v1.cm.ping`` (any answer, even an error, means it runs)."""
    try:
        await bus.request(subjects.CM_PING, b"", timeout=timeout)
    except errors.UnavailableError:
        return False
    except errors.PermissionDeniedError:
        raise
    except errors.IotdlmError:
        return True
    return True


def parse_record(entry: KeyValueEntry | None, verifier: ModeVerifier) -> ModeRecord | None:
    """The mode in a bucket entry; ``None`` for no value. A value that does not verify raises
    the RejectedError saying why (an alarm for the caller)."""
    if entry is None or not entry.value:
        return None
    return verifier.verify(entry.value)


def mode_alarm_subject(module: str) -> str:
    """Where ``module``'s guard reports a mode record it cannot verify."""
    return subjects.events(module, MODE_ALARM)


#: the event name of a mode record a service refused
MODE_ALARM = subjects.MODE_ALARM
#: the same alarm reason at most once per this many seconds (per process)
ALARM_EVERY = 60.0
#: distinct reasons tracked at once; beyond, new reasons share one limit (an attacker choosing
#: the reason -- a signer's name, a decoding error -- cannot get past the limit by varying it)
MAX_REASONS = 16
_OTHER_REASONS = "(other reasons)"


class AlarmLimiter:
    """At most one alarm per reason every ``every`` seconds; pure (``monotonic`` is injected).

    :meth:`admit` returns ``None`` for an alarm to hold back, or, for one to report, how many
    alarms of that reason were held back since the last report.
    """

    def __init__(
        self, *, every: float = ALARM_EVERY, monotonic: Callable[[], float], max_reasons: int = MAX_REASONS
    ) -> None:
        if every <= 0 or max_reasons <= 0:
            raise ValueError("every and max_reasons must be positive")
        self._every = every
        self._monotonic = monotonic
        self._max_reasons = max_reasons
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def admit(self, reason: str) -> int | None:
        now = self._monotonic()
        for key, at in list(self._last.items()):
            if now - at >= self._every and not self._held.get(key):
                del self._last[key]
        key = reason if reason in self._last or len(self._last) < self._max_reasons else _OTHER_REASONS
        last = self._last.get(key)
        if last is not None and now - last < self._every:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


class ModeGuard:
    """The current operation mode, cached, for a service to check before it acts.

    ``monotonic`` is the clock that ages the cache (injected for tests).
    """

    def __init__(
        self,
        bus: Bus,
        verifier: ModeVerifier,
        *,
        refresh_every: float = 1.0,
        max_age: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
        alarm_every: float = ALARM_EVERY,
    ) -> None:
        if refresh_every <= 0 or max_age <= 0:
            raise ValueError("refresh_every and max_age must be positive")
        self._bus = bus
        self._verifier = verifier
        #: the bucket revision last reported as an alarm (one alarm per forged value)
        self._alarmed: int | None = None
        self._limiter = AlarmLimiter(every=alarm_every, monotonic=monotonic)
        #: why the last value read did not verify (None: it did, or there was none)
        self.problem: str | None = None
        self._refresh_every = refresh_every
        self._max_age = max_age
        self._monotonic = monotonic
        self._record: ModeRecord | None = None
        self._confirmed_at: float | None = None
        self._kv: KeyValue | None = None
        self._watch: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    # --- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Read the mode once and keep it fresh. Never fails: until a mode is read, it is unknown."""
        if self._task is not None:
            return
        await self._tick()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="mode-guard")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        watch, self._watch = self._watch, None
        if watch is not None:
            with contextlib.suppress(errors.IotdlmError):
                await watch.unsubscribe()

    async def __aenter__(self) -> ModeGuard:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_every)
            await self._tick()

    async def _tick(self) -> None:
        try:
            await self.refresh()
        except errors.IotdlmError as exc:  # the cache ages; past max_age the mode is unknown
            log.debug("%s: cannot read the mode: %s", self._bus.module, exc)

    async def refresh(self) -> None:
        """Read the mode now (and start the watch if it is not running)."""
        try:
            if self._kv is None:
                self._kv = await self._bus.key_value(subjects.MODE_BUCKET)
            if self._watch is None:
                self._watch = await self._kv.watch(subjects.MODE_KEY, self._on_change)
            entry = await self._kv.get(subjects.MODE_KEY)
        except errors.NotFoundError:
            # no bucket: no supervisor ever published a mode here
            await self._set(None)
            return
        await self._set(entry)

    async def _on_change(self, entry: KeyValueEntry | None) -> None:
        await self._set(entry)

    async def _set(self, entry: KeyValueEntry | None) -> None:
        if entry is not None and entry.value:
            await self._verifier.refresh_revocation(entry.value, self._bus)
        try:
            record = parse_record(entry, self._verifier)
            self.problem = None
        except errors.RejectedError as exc:
            assert entry is not None
            record = None
            self.problem = exc.message
            await self._alarm(entry.revision, exc.message, revoked=isinstance(exc, RevokedSignerError))
        if record != self._record:
            log.info("%s: operation mode is now %s", self._bus.module, record.mode if record is not None else "unknown")
        self._record = record
        self._confirmed_at = self._monotonic()
        self._changed.set()

    async def _alarm(self, revision: int, reason: str, *, revoked: bool) -> None:
        if self._alarmed == revision:
            return
        self._alarmed = revision
        module = self._bus.module
        held = self._limiter.admit(reason)
        if held is None:
            log.debug("%s refuses the mode record (revision %d), alarm held back: %s", module, revision, reason)
            return
        log.error(
            "%s refuses the mode record in bucket %s (revision %d): %s%s",
            module,
            subjects.MODE_BUCKET,
            revision,
            reason,
            f" ({held} more alarms held back)" if held else "",
        )
        alarm = ModeAlarm(module=module, revision=revision, reason=reason, suppressed=held)
        try:
            await self._bus.publish(mode_alarm_subject(module), encode(alarm))
        except errors.IotdlmError as exc:
            log.error("%s could not publish the mode alarm: %s", module, exc)
        if revoked:  # the supervisor's certificate is revoked: its key is the operator's worry
            await revocation.alarm(self._bus, subjects.SUPERVISOR, reason)

    # --- reading ----------------------------------------------------------------------------
    @property
    def record(self) -> ModeRecord | None:
        """The current mode record, or ``None`` if unknown (never read, none published, or stale)."""
        if self._confirmed_at is None or self._monotonic() - self._confirmed_at > self._max_age:
            return None
        return self._record

    @property
    def refused_revision(self) -> int | None:
        """The bucket revision of the last value that did not verify (``None``: none yet)."""
        return self._alarmed

    @property
    def mode(self) -> str | None:
        record = self.record
        return record.mode if record is not None else None

    async def wait_for(self, mode: str | None, *, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Until the cached mode is ``mode`` (tests, and services that start before a switch ends)."""

        async def wait() -> None:
            while self.mode != mode:
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise errors.UnavailableError(f"the mode did not become {mode} within {timeout:g} s") from None

    def require(self, allowed_modes: Set[str], what: str) -> str:
        """Return the current mode if it is one of ``allowed_modes``; raise ModeError otherwise.

        Synchronous, so code running in a worker thread can call it too.
        """
        mode = self.mode
        if mode is not None and mode in allowed_modes:  # every request passes here: nothing else to build
            return mode
        if not allowed_modes:
            raise ValueError("allowed_modes must name at least one mode")
        needed = " or ".join(sorted(str(m) for m in allowed_modes))
        first = sorted(str(m) for m in allowed_modes)[0]
        if mode is None and self.problem is not None and self._confirmed_at is not None:
            raise errors.ModeError(
                f"{self._bus.module} refuses {what}: the operation mode cannot be trusted ({self.problem}); "
                f"the operator re-asserts it with `iotdlm mode set {first}` (or the mode in force)",
                field="mode",
            )
        if mode is None:
            raise errors.ModeError(
                f"{self._bus.module} refuses {what}: the operation mode is unknown (no supervisor published one, "
                f"or it could not be read for {self._max_age:g} s); it needs {needed} "
                f"(`iotdlm up --mode {first}` or `iotdlm mode set {first}`)",
                field="mode",
            )
        if mode not in allowed_modes:
            raise errors.ModeError(
                f"{self._bus.module} refuses {what} in mode {mode}: it needs {needed} (`iotdlm mode set {first}`)",
                field="mode",
            )
        return mode

    async def require_cm_off(self, what: str, *, timeout: float = 1.0) -> None:  # noqa: ASYNC109
        """Raise ModeError if cm -- the door to the outside -- answers its ping."""
        if await cm_running(self._bus, timeout=timeout):
            raise errors.ModeError(
                f"{self._bus.module} refuses {what}: cm is running, so the system is reachable from outside; "
                "provisioning needs cm off (`iotdlm mode set provisioning-software` or provisioning-certificate)",
                field="mode",
            )
