"""Stopping tasks: a task that swallowed its cancellation (Python 3.11's wait_for can) still stops."""

from __future__ import annotations

import asyncio

from iotdlm.aio import cancel_and_wait, stop_serving


async def test_a_task_that_swallows_one_cancellation_is_cancelled_again() -> None:
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            swallowed.set()  # as asyncio.wait_for does when its future completes at the same time
        await asyncio.Event().wait()  # the next await: a single cancel() would leave it here for ever

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert await cancel_and_wait([task], within=5.0) == 0
    assert swallowed.is_set()
    assert task.cancelled()


async def test_a_task_that_never_stops_is_reported_not_waited_for() -> None:
    listening = False

    async def deaf() -> None:
        while not listening:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(deaf())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await cancel_and_wait([task], within=0.3) == 1
    assert loop.time() - start < 2.0
    listening = True  # let it go, so the test leaves no task behind
    task.cancel()
    await asyncio.wait({task}, timeout=2.0)
    assert task.done()


async def test_failed_and_finished_tasks_are_fine() -> None:
    async def boom() -> None:
        raise RuntimeError("on the way out")

    failed = asyncio.create_task(boom())
    finished = asyncio.create_task(asyncio.sleep(0))
    await asyncio.sleep(0.01)
    assert await cancel_and_wait([failed, finished]) == 0


async def test_stop_serving_cancels_tasks_then_unsubscribes_and_empties_both() -> None:
    order: list[str] = []

    class Sub:
        def __init__(self, name: str) -> None:
            self.name = name

        async def unsubscribe(self) -> None:
            order.append(f"unsubscribe {self.name}")

    async def worker() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            order.append("task stopped")

    tasks = [asyncio.create_task(worker())]
    subs = [Sub("a"), Sub("b")]
    await asyncio.sleep(0)
    await stop_serving(tasks, subs, what="test tasks")
    assert order == ["task stopped", "unsubscribe a", "unsubscribe b"]
    assert tasks == []
    assert subs == []
