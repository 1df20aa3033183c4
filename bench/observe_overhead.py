"""What the metrics cost (issue 14, docs/adr/0018): a bus request through the instrumented bus
beside the same request without it, and a scrape's work (one process's exposition, merging those
of several processes) beside one plain request.

The yardstick is a plain request on the in-memory bus, measured in the same run (this machine is
shared and noisy: read the ratios). The in-memory bus is the cheapest transport there is, so the
wrapper's share of a real request (a NATS round trip, a km signature) is smaller than shown.

Run: ``PYTHONPATH=src .venv/bin/python bench/observe_overhead.py [--requests 20000] [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from iotdlm.bus import Message
from iotdlm.bus import subjects as s
from iotdlm.bus.memory import MemoryHub
from iotdlm.observe import ModuleMetrics, merge_expositions
from iotdlm.observe.serve import InstrumentedBus


async def _answer(_m: Message) -> bytes:
    return b"ok"


async def per_request(n: int, *, instrumented: bool) -> float:
    """Seconds per request, sequential, on a fresh hub."""
    hub = MemoryHub()
    km = hub.bus("km")
    server = InstrumentedBus(km, ModuleMetrics("km", pid=1)) if instrumented else km
    await server.serve(s.KM_CHAIN, _answer)
    admin = hub.bus("admin")
    for _ in range(200):  # warm up
        await admin.request(s.KM_CHAIN, b"")
    t0 = time.perf_counter()
    for _ in range(n):
        await admin.request(s.KM_CHAIN, b"")
    elapsed = time.perf_counter() - t0
    await km.close()
    await admin.close()
    return elapsed / n


async def wrapper_alone(n: int) -> tuple[float, float]:
    """(seconds per direct handler call, seconds per call through the wrapper): no bus at all,
    so the few microseconds the wrapper adds are not lost in the bus's own noise."""
    hub = MemoryHub()
    wrapped = InstrumentedBus(hub.bus("km"), ModuleMetrics("km", pid=1)).timed("km.ca.chain", _answer)
    msg = Message(s.KM_CHAIN, b"")
    t0 = time.perf_counter()
    for _ in range(n):
        await _answer(msg)
    direct = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n):
        await wrapped(msg)
    return direct, (time.perf_counter() - t0) / n


def _busy_metrics(pid: int) -> ModuleMetrics:
    """A process's metrics after some work: 4 profiles, 6 refusal codes, 12 operations."""
    m = ModuleMetrics("km", pid=pid)
    for i in range(4):
        m.issued_one(f"profile-{i}", 0.003)
    for i in range(6):
        m.refused(f"code_{i}")
    for i in range(12):
        m.requests.labels(f"km.op{i}").observe(0.002)
    m.set_mode("certificate-management")
    return m


def scrape_work(processes: int, rounds: int) -> tuple[float, float]:
    """(seconds for one process's exposition, seconds to merge ``processes`` of them)."""
    metrics = [_busy_metrics(p) for p in range(processes)]
    t0 = time.perf_counter()
    for _ in range(rounds):
        texts = [m.exposition() for m in metrics]
    one = (time.perf_counter() - t0) / (rounds * processes)
    t0 = time.perf_counter()
    for _ in range(rounds):
        merge_expositions(texts)
    return one, (time.perf_counter() - t0) / rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="a few-second smoke run")
    args = ap.parse_args()
    n, repeats = (2_000, 2) if args.quick else (args.requests, args.repeats)
    plain, wrapped = [], []
    for _ in range(repeats):  # interleaved, so a noisy moment hits both
        plain.append(asyncio.run(per_request(n, instrumented=False)))
        wrapped.append(asyncio.run(per_request(n, instrumented=True)))
    p, w = statistics.median(plain), statistics.median(wrapped)
    alone = [asyncio.run(wrapper_alone(n * 5)) for _ in range(repeats)]
    direct = statistics.median(a for a, _ in alone)
    through = statistics.median(b for _, b in alone)
    one, merged = scrape_work(8, 5 if args.quick else 50)
    print("| what | per call | x plain request (yardstick) |")
    print("|---|---|---|")
    print(f"| plain request, in-memory bus (yardstick) | {p * 1e6:.1f} us | 1.00 |")
    print(f"| the same through the instrumented bus | {w * 1e6:.1f} us | {w / p:.2f} |")
    print(f"| the instrumentation's share of it (difference of the two) | {(w - p) * 1e6:.1f} us | {(w - p) / p:.2f} |")
    extra = through - direct
    print(f"| the wrapper alone: handler through it, minus called directly | {extra * 1e6:.2f} us | {extra / p:.3f} |")
    print(f"| one process's exposition (busy km) | {one * 1e6:.0f} us | {one / p:.1f} |")
    print(f"| merging 8 processes' expositions (one scrape) | {merged * 1e3:.2f} ms | {merged / p:.0f} |")
    print(f"\n{n} requests x {repeats} repeats (median); 8 processes for the scrape")


if __name__ == "__main__":
    main()
