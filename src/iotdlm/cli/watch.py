"""``iotdlm status --watch``: a refreshing view of each service's readiness and key counters.

The supervisor says which services run (``iotdlm.v1.modes.status``); each running process is then
asked for its health on ``iotdlm.v1.<module>.health.<pid>`` (docs/adr/0018). ``--json`` prints one
snapshot (stable keys, documented in docs/operations.md) and exits. A Grafana-free look at the
numbers the supervisor's ``/metrics`` serves to Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgspec
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from iotdlm.bus import Bus, subjects
from iotdlm.cli.common import console
from iotdlm.deployment import Deployment
from iotdlm.errors import IotdlmError, UnavailableError
from iotdlm.wire import health as h
from iotdlm.wire import modes as m

#: seconds between refreshes
REFRESH = 2.0
#: seconds each process may take to say how it is
HEALTH_TIMEOUT = 2.0


async def _health(bus: Bus, svc: m.ServiceHealth) -> dict[str, Any]:
    row: dict[str, Any] = {"name": svc.name, "module": svc.module, "state": svc.state, "pid": svc.pid}
    row.update(restarts=svc.restarts, last_exit=svc.last_exit, health=None, error=None)
    if svc.pid is None:
        return row
    try:
        raw = await bus.request(f"{subjects.health_subject(svc.module)}.{svc.pid}", b"", timeout=HEALTH_TIMEOUT)
        row["health"] = msgspec.to_builtins(h.decode(raw))
    except IotdlmError as exc:
        row["error"] = exc.message
    return row


async def snapshot(bus: Bus) -> dict[str, Any]:
    """The mode and every service with its health (``health`` None and ``error`` set when a
    running process did not answer). Raises UnavailableError when no supervisor answers."""
    st = m.decode(await bus.request(subjects.MODES_STATUS, b"", timeout=5.0), m.StatusReply)
    rows = await asyncio.gather(*(_health(bus, svc) for svc in st.services))
    return {"mode": st.mode, "since": st.since, "switching": st.switching, "services": list(rows)}


def _num(health: dict[str, Any] | None, key: str) -> str:
    if health is None:
        return "-"
    return f"{int(health['counters'].get(key, 0))}"


def render(snap: dict[str, Any]) -> Group:
    head = Text.from_markup(f"mode [bold]{escape(str(snap['mode'] or 'none'))}[/bold]")
    if snap["switching"]:
        head.append(f" switching {snap['switching']}", style="yellow")
    table = Table("service", "ready", "reason", "in flight", "mean ms", "issued", "refused", "ocsp", "crls", "http")
    for row in snap["services"]:
        hl = row["health"]
        if hl is None:
            ready = "[dim]off[/dim]" if row["pid"] is None else "[red]no answer[/red]"
            reason = escape(row["error"] or row["state"])
            latency = flight = "-"
        else:
            ready = "[green]yes[/green]" if hl["ready"] else "[red]no[/red]"
            reason = escape(hl["reason"])
            mean = hl["mean_request_seconds"]
            latency = f"{mean * 1000:.1f}" if mean is not None else "-"
            flight = str(hl["in_flight"])
        counts = [_num(hl, k) for k in ("issued", "refused", "ocsp", "crls", "http")]
        table.add_row(row["name"], ready, reason, flight, latency, *counts)
    return Group(head, table, Text("Ctrl-C leaves", style="dim"))


async def watch(dep: Deployment, *, as_json: bool) -> None:
    from iotdlm.runtime import connect_identity

    bus, _ = await connect_identity(dep, "admin")
    try:
        first = await snapshot(bus)
        if as_json:
            console.print_json(data=first)
            return
        with Live(render(first), console=console, auto_refresh=False) as live:
            while True:
                await asyncio.sleep(REFRESH)
                try:
                    live.update(render(await snapshot(bus)), refresh=True)
                except UnavailableError as exc:
                    live.update(Text(f"no supervisor answers: {exc.message}", style="red"), refresh=True)
    finally:
        await bus.close()


def watch_status(dep: Deployment, *, as_json: bool) -> None:
    """Run :func:`watch` until Ctrl-C (which ends it quietly)."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(watch(dep, as_json=as_json))
