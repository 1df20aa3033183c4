"""Group commit: the records of concurrent km requests written in one store transaction.

Every issuance ends in one write transaction (ADR 0003). On SQLite those transactions are
serialised by the database's single write lock, so with many single-certificate requests in
flight the workers spend most of their time taking that lock, not signing (docs/benchmarks.md,
issue 15). :class:`GroupCommit` lets the requests that reach their commit while another commit is
running wait for it, then writes all of them in one transaction (ADR 0021):

- a request alone commits at once (no timer, no added latency when nothing else is going on);
- each caller returns only after the transaction holding its records committed, and raises what
  its own records raised: if the shared transaction fails (a replayed nonce, a serial collision,
  a duplicate), nothing of it is stored and every member is written again alone, so one bad
  request never takes the others down and never stores anything itself; a failure of the
  database itself (``shared``) is every member's at once.

Synchronous and thread-safe: km's handlers run in worker threads (``asyncio.to_thread``). On the
event loop (ADR 0032) a handler runs under :func:`run_on_loop`, in a greenlet: there ``submit``
queues its item and lets the loop go on (the other requests that arrived with it run up to their
own ``submit``), and one callback of the loop then writes all of them in one transaction and
resumes each. Nothing else suspends a handler: between two ``submit`` calls it runs as it would
in a thread, so no lock is ever held across a suspension.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import greenlet  # type: ignore[import-untyped,unused-ignore]

T = TypeVar("T")
R = TypeVar("R")


class _OnLoop(greenlet.greenlet):  # type: ignore[misc]
    """A handler running on the event loop under :func:`run_on_loop`."""


async def run_on_loop(fn: Callable[..., R], *args: Any) -> R:
    """``fn(*args)`` on the event loop, where a :meth:`GroupCommit.submit` inside it waits for its
    group's commit without blocking the loop (a greenlet switch, as SQLAlchemy's asyncio layer
    does). Returns what ``fn`` returns; raises what it raises."""
    g = _OnLoop(fn)
    g.gr_context = greenlet.getcurrent().gr_context  # the task's context variables, as SQLAlchemy does
    step = g.switch(*args)
    while not g.dead:
        try:
            value = await step
        except BaseException as exc:  # handed to fn, which raises it where it waited
            step = g.throw(exc)
        else:
            step = g.switch(value)
    return step  # type: ignore[no-any-return]


def _wait_on_loop(awaitable: Awaitable[Any]) -> Any:
    """Inside :func:`run_on_loop`: give the loop back until ``awaitable`` is done."""
    current = greenlet.getcurrent()
    assert isinstance(current, _OnLoop)
    assert current.parent is not None
    return current.parent.switch(awaitable)


@dataclass(eq=False)
class _Job(Generic[T]):
    item: T
    done: bool = False
    error: BaseException | None = None
    group_size: int = field(default=0)


class GroupCommit(Generic[T]):
    """Runs ``write(items)`` for groups of items submitted concurrently; see the module docstring.

    ``write`` must be all-or-nothing (one transaction). ``max_group`` bounds one transaction.
    ``shared(exc)``: the group's failure is every member's (the database is down, say: writing each
    member again would only wait N more times), not a reason to write them again one by one.
    """

    def __init__(
        self,
        write: Callable[[Sequence[T]], None],
        *,
        max_group: int = 256,
        shared: Callable[[BaseException], bool] = lambda _exc: False,
    ) -> None:
        if max_group < 1:
            raise ValueError("max_group must be at least 1")
        self._write = write
        self._shared = shared
        self._max_group = max_group
        self._cv = threading.Condition()
        self._queue: list[_Job[T]] = []
        self._busy = False
        #: items submitted on the event loop (run_on_loop) since its last commit callback, each with
        #: its own future (a cancelled request cancels only its own wait)
        self._on_loop: list[tuple[_Job[T], asyncio.Future[None]]] = []
        #: transactions written and items they held (for the benchmarks and tests)
        self.transactions = 0
        self.items = 0

    @property
    def waiting(self) -> int:
        """Items queued behind the commit that is running."""
        with self._cv:
            return len(self._queue)

    def submit(self, item: T) -> int:
        """Write ``item`` (with whatever else is waiting); return once it is committed, with the
        number of items its transaction held. Raises what writing ``item`` alone raises."""
        if isinstance(greenlet.getcurrent(), _OnLoop):
            return self._submit_on_loop(item)
        job: _Job[T] = _Job(item)
        with self._cv:
            self._queue.append(job)
            while self._busy and not job.done:
                self._cv.wait()
            if not job.done:
                # this thread leads: take what is waiting (this job among it) and write it
                self._busy = True
                group, self._queue = self._queue[: self._max_group], self._queue[self._max_group :]
        if not job.done:
            try:
                self._run(group)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
        if job.error is not None:
            raise job.error
        return job.group_size

    def _submit_on_loop(self, item: T) -> int:
        job: _Job[T] = _Job(item)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        if not self._on_loop:
            # after the callbacks already queued: the requests that came in with this one
            loop.call_soon(self._commit_on_loop)
        self._on_loop.append((job, done))
        _wait_on_loop(done)
        if job.error is not None:
            raise job.error
        return job.group_size

    def _commit_on_loop(self) -> None:
        """The loop's commit: everything submitted on it since the last, as a leader writes."""
        waiting, self._on_loop = self._on_loop, []
        jobs = [job for job, _done in waiting]
        try:
            with self._cv:
                while self._busy:  # a thread's commit (a batch) is being written
                    self._cv.wait()
                self._busy = True
            try:
                for start in range(0, len(jobs), self._max_group):
                    self._run(jobs[start : start + self._max_group])
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
        except BaseException as exc:  # every waiter gets it rather than hanging
            for job in jobs:
                if not job.done:
                    job.error, job.done = exc, True
        for _job, done in waiting:
            if not done.done():  # its request was cancelled meanwhile: nobody waits for it
                done.set_result(None)

    def _run(self, group: list[_Job[T]]) -> None:
        try:
            self._write([j.item for j in group])
        except BaseException as exc:
            if len(group) == 1 or self._shared(exc):
                self._finish(group, len(group), exc)
                return
            # the shared transaction stored nothing: each member alone, with its own outcome
            for job in group:
                try:
                    self._write([job.item])
                except BaseException as own:
                    self._finish([job], 1, own)
                else:
                    self._finish([job], 1, None)
            return
        self._finish(group, len(group), None)

    def _finish(self, jobs: list[_Job[T]], size: int, error: BaseException | None) -> None:
        with self._cv:
            self.transactions += 1
            self.items += len(jobs)
            for job in jobs:
                job.error, job.group_size, job.done = error, size, True
            self._cv.notify_all()
