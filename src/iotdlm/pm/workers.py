"""pm's worker threads: the flasher, the store and the copy of the image block, so they run here.

One :class:`Workers` per :class:`~iotdlm.pm.provisioner.Provisioner`, sized by
``PmSettings.concurrency`` (the devices flashed at once); the Provisioner owns it and shuts it down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

_T = TypeVar("_T")


class Workers:
    """A thread pool the event loop hands blocking calls to."""

    def __init__(self, concurrency: int, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=name)

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` in a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        """Wait for the running calls and stop the threads."""
        self._executor.shutdown(wait=True)
