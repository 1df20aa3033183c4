"""``iotdlm fleet run --workers N``: the fleet's devices split over N worker processes, each with
its own event loop, so a fleet keeps every core busy (one Python process runs on one core).

The parent makes the devices ready (:func:`iotdlm.cli.fleet.ready_devices`: the factory line needs
the deployment), then hands each worker a share of the device folders (round robin). A worker
wires each device's loop as one process would (:func:`iotdlm.cli.fleet.runner_for`) and sends what
each pass did (:class:`~iotdlm.device.runner.TickReport`) back on a queue; the parent keeps the
progress bar and the summary. A device lives in exactly one worker: its keys, TLS contexts and
connections never meet another device's outside that device's own loop.

Stopping: Ctrl-C or SIGTERM to the parent sets a shared event; each worker finishes the passes under
way and stops. A worker that dies leaves its unreported devices in the summary as failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import math
import multiprocessing
import os
import queue as queue_mod
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

from iotdlm.device.runner import TickReport

#: a worker per this many devices (up to the machine's cores): small fleets stay in one process
DEVICES_PER_WORKER = 100


@dataclass(frozen=True)
class FleetPlan:
    """How every device's loop runs (the same in each worker)."""

    renew_at: float
    timeout: float = 30.0
    once: bool = False
    interval: float = 60.0
    #: device passes running at once, per process
    concurrency: int = 32
    #: seconds before the transfer agent's first retry of a step (None: the agent's default)
    retry_delay: float | None = None
    #: each worker writes a cProfile of its passes here (``worker-<i>.prof``; benchmarks)
    profile_dir: Path | None = None
    #: constrained devices (ADR 0029): (cm's coap:// URI, its EDHOC credential) pairs; empty: HTTPS
    cm_credentials: tuple[tuple[str, bytes], ...] = ()


def default_workers(count: int, cpus: int | None = None) -> int:
    """One process per :data:`DEVICES_PER_WORKER` devices, at most one per core."""
    cores = cpus if cpus is not None else (os.cpu_count() or 1)
    return max(1, min(cores, math.ceil(count / DEVICES_PER_WORKER)))


def share(paths: Sequence[Path], workers: int) -> list[list[Path]]:
    """The device folders of each worker: round robin, none empty, every folder in exactly one."""
    n = max(1, min(workers, len(paths)))
    return [list(paths[i::n]) for i in range(n)]


async def run_devices(
    paths: Sequence[Path], plan: FleetPlan, *, workers: int, progress: bool, label: str = "devices on the network"
) -> Any:
    """Run the devices' loops (in this process when ``workers`` is 1) and return the
    :class:`iotdlm.cli.fleet.Summary` of their passes."""
    from iotdlm.cli.fleet import drive, runner_for
    from iotdlm.clock import SystemClock
    from iotdlm.device.simulated import SimulatedDevice

    if workers <= 1 or len(paths) <= 1:
        clock = SystemClock()
        runners = [_runner(runner_for, SimulatedDevice(p), clock, plan) for p in paths]
        return await drive(runners, once=plan.once, interval=plan.interval, progress=progress,
                           concurrency=plan.concurrency, label=label)  # fmt: skip
    return await _in_workers(share(paths, workers), plan, progress=progress, label=label)


def _runner(runner_for: Any, dev: Any, clock: Any, plan: FleetPlan) -> Any:
    creds = dict(plan.cm_credentials) or None
    r = runner_for(dev, clock, renew_at=plan.renew_at, timeout=plan.timeout, cm_credentials=creds)
    if plan.retry_delay is not None and r.transfers is not None:
        r.transfers.retry_delay = plan.retry_delay
    return r


async def _in_workers(shares: list[list[Path]], plan: FleetPlan, *, progress: bool, label: str) -> Any:
    from iotdlm.cli.fleet import Summary, progress_bar, stop_on_signals

    ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no copy of this loop or its threads
    reports: Any = ctx.Queue()
    stop = ctx.Event()
    procs = [
        ctx.Process(target=worker_main, args=(paths, plan, reports, stop, i), name=f"iotdlm-fleet-{i}", daemon=True)
        for i, paths in enumerate(shares)
    ]
    for p in procs:
        p.start()
    summary = Summary()
    done: set[int] = set()
    seen: set[str] = set()
    crashed: dict[int, str] = {}
    with stop_on_signals(stop.set), progress_bar(progress, sum(len(s) for s in shares), label) as advance:
        while len(done) < len(procs):
            msg = await asyncio.to_thread(_get, reports, 0.25)
            if msg is None:
                for i, p in enumerate(procs):
                    if i not in done and p.exitcode is not None and not _pending(reports):
                        done.add(i)
                        crashed.setdefault(i, f"the worker process exited with code {p.exitcode}")
                continue
            kind, index, payload = msg
            if kind == "tick":
                summary.add(payload)
                if payload.device_id not in seen:
                    seen.add(payload.device_id)
                    advance()
            elif kind == "crash":
                crashed[index] = payload
            else:
                done.add(index)
    for p in procs:
        await asyncio.to_thread(p.join, 10.0)
    for i, why in sorted(crashed.items()):
        for path in shares[i]:
            if path.name not in summary.devices:
                summary.add(TickReport(path.name, errors=[f"fleet worker {i}: {why}"]))
    return summary


def _get(q: Any, timeout: float) -> Any:
    try:
        return q.get(True, timeout)
    except queue_mod.Empty:
        return None


def _pending(q: Any) -> bool:
    try:
        return not q.empty()
    except (OSError, ValueError):  # the queue is closed: nothing more will come
        return False


def worker_main(paths: list[Path], plan: FleetPlan, reports: Any, stop: MpEvent, index: int) -> None:
    """A worker process: its share of the devices on an event loop of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which says stop
    profile = cProfile.Profile() if plan.profile_dir is not None else None
    try:
        if profile is not None:
            profile.enable()
        asyncio.run(_work(paths, plan, reports, stop, index))
        if profile is not None and plan.profile_dir is not None:
            profile.disable()
            profile.dump_stats(plan.profile_dir / f"worker-{index}.prof")
    except BaseException as exc:  # told to the parent, which lists the devices as failed
        reports.put(("crash", index, f"{type(exc).__name__}: {exc}"))
    finally:
        reports.put(("done", index, None))
        reports.close()
        reports.join_thread()


async def _work(paths: list[Path], plan: FleetPlan, reports: Any, stop: MpEvent, index: int) -> None:
    from iotdlm.cli.fleet import runner_for
    from iotdlm.clock import SystemClock
    from iotdlm.device.runner import run_fleet
    from iotdlm.device.simulated import SimulatedDevice

    clock = SystemClock()
    runners = [_runner(runner_for, SimulatedDevice(p), clock, plan) for p in paths]
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def watch() -> None:
        while not await asyncio.to_thread(stop.wait, 0.5):
            pass
        stopped.set()

    watcher = asyncio.create_task(watch())
    try:
        await run_fleet(
            runners, once=plan.once, interval=plan.interval, stop=stopped, concurrency=plan.concurrency,
            on_tick=lambda r: reports.put(("tick", index, r)),
        )  # fmt: skip
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


__all__ = ["DEVICES_PER_WORKER", "FleetPlan", "default_workers", "run_devices", "share", "worker_main"]
