"""asyncio helpers every service shares."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Protocol, TypeVar

log = logging.getLogger(__name__)

#: how often a task that ignored its cancellation is cancelled again
_RECANCEL_EVERY = 0.5


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object]], *, within: float = 5.0, what: str = "tasks") -> int:
    """Cancel ``tasks`` and wait until they are done, at most ``within`` seconds; return how many
    are still running then (logged).

    A task is cancelled again every half second while it runs: on Python 3.11 ``asyncio.wait_for``
    (which nats-py's flush uses) swallows a cancellation that arrives as the awaited future
    completes (CPython gh-86296), and the task then goes on to its next await -- a stop that
    cancelled it once and awaited it would wait there for ever.
    """
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while pending:
        for t in pending:
            t.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _done, pending = await asyncio.wait(pending, timeout=min(_RECANCEL_EVERY, left))
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()  # retrieved: a task that failed on its way out is not "never retrieved"
    if pending:
        log.warning("%d of the %s did not stop within %g s", len(pending), what, within)
    return len(pending)


class _Unsubscribable(Protocol):
    async def unsubscribe(self) -> None: ...


_S = TypeVar("_S", bound=_Unsubscribable)


async def stop_serving(tasks: list[asyncio.Task[None]], subs: list[_S], *, what: str) -> None:
    """Stop a bus service: cancel its background ``tasks`` (:func:`cancel_and_wait`), then drop its
    subscriptions; both lists are left empty, so a service may be started again."""
    await cancel_and_wait(tasks, what=what)
    tasks.clear()
    for sub in subs:
        await sub.unsubscribe()
    subs.clear()
