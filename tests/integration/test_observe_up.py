"""The supervisor with the real km and cm processes (issue 14, docs/adr/0018): its loopback
/metrics gathers each process over the bus, km's counters move when km answers pm, and
`iotdlm status --watch --json` (the real entry point, as its own process) says km is not ready
while km's process is stopped, and cm's readiness says why; after a mode switch the same /metrics
scrapes pm in cm's place."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tomllib
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

from iotdlm.bus import subjects as s
from iotdlm.bus.server import free_port
from iotdlm.client.km import KmClient
from iotdlm.clock import SystemClock
from iotdlm.deployment import CONFIG_FILE, PASSPHRASE_ENV, Deployment, init_deployment
from iotdlm.errors import IotdlmError, ModeError
from iotdlm.modes.table import Mode
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.runtime import connect_identity, km_trust, sealer_for
from iotdlm.supervisor.processes import SupervisorSettings
from iotdlm.supervisor.supervisor import Supervisor
from iotdlm.wire import health as h
from tests.helpers import make_csr

pytestmark = pytest.mark.nats

#: guards against hangs only; no assertion depends on how long anything takes
WAIT = 90.0
DTYPE = "board-a"


async def until(cond: Callable[[], Awaitable[bool]], what: str) -> None:
    async def poll() -> None:
        while True:
            if await cond():
                return
            await asyncio.sleep(0.2)

    try:
        await asyncio.wait_for(poll(), WAIT)
    except TimeoutError:
        pytest.fail(f"never: {what}")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (smp.name, tuple(sorted(smp.labels.items()))): smp.value
        for fam in text_string_to_metric_families(text)
        for smp in fam.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(
        v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items())
    )


async def watch_json(data: Path) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "iotdlm.cli.main",
        "status",
        "--data",
        str(data),
        "--watch",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Deployment, Supervisor, int]]:
    made, _ = init_deployment(
        tmp_path / "site",
        organization="T",
        algorithm=Algorithm.P256,
        dtypes=[DTYPE],
        passphrase=b"pw",
        nats_port=free_port(),
        now=SystemClock().now(),
    )
    metrics_port = free_port()
    path = made.root / CONFIG_FILE
    config = tomllib.loads(path.read_text())
    path.write_text(tomli_w.dumps({**config, "metrics_port": metrics_port}))
    (made.root / "cm.toml").write_text(f"https_port = {free_port()}\nhttp = false\n")
    dep = Deployment.load(made.root)
    sup = Supervisor(dep, env={**os.environ, PASSPHRASE_ENV: "pw"}, settings=SupervisorSettings(stop_timeout=20))
    try:
        await sup.start(Mode.CERTIFICATE_MANAGEMENT, by="test")
        yield dep, sup, metrics_port
    finally:
        await sup.stop()


async def test_metrics_and_status_watch_with_the_real_km_and_cm(running: tuple[Deployment, Supervisor, int]) -> None:
    dep, sup, port = running
    admin, _ = await connect_identity(dep, "admin")
    try:

        async def ready(module: str) -> bool:
            try:
                return h.decode(await admin.request(s.health_subject(module), b"", timeout=1.0)).ready
            except IotdlmError:
                return False

        await until(lambda: ready("km"), "km says it is ready")
        await until(lambda: ready("cm"), "cm says it is ready")
        pids = {name: svc.pid for name, svc in sup.services().items()}
        firsts: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]] = []

        async def both_scraped() -> bool:
            # each answers its health in its queue group first; the per-process metrics subject, asked
            # with a 2 s timeout, missed once in CI's +3y pass right after km said it was ready
            firsts.append(await asyncio.to_thread(scrape, port))
            return all(value(firsts[-1], "iotdlm_scrape_ok", instance=f"{n}-{pids[n]}") == 1 for n in ("km", "cm"))

        await until(both_scraped, "the supervisor's /metrics to scrape km and cm")
        first = firsts[-1]
        assert value(first, "iotdlm_service_up", service="km") == 1
        assert value(first, "iotdlm_service_up", service=f"pm-{DTYPE}") == 0  # off in this mode (Table 1)
        assert value(first, "iotdlm_mode", module="km", mode="certificate-management") == 1

        # pm's request reaches km's real process, which refuses it in this mode (Table 1): the
        # refusal counts by its code in the supervisor's /metrics (an issuance counts alike:
        # tests/integration/test_observe.py)
        pm_bus, ident = await connect_identity(dep, f"pm-{DTYPE}")
        try:
            km = KmClient(pm_bus, sealer_for(ident), SystemClock(), trust=km_trust(dep))
            with pytest.raises(ModeError):
                await km.issue("dev-obs", "factory", csr=make_csr(generate_key(Algorithm.P256), "dev-obs"))
        finally:
            await pm_bus.close()
        after = await asyncio.to_thread(scrape, port)
        refused = "iotdlm_refusals_total"
        km_instance = f"km-{pids['km']}"
        assert (
            value(after, refused, instance=km_instance, code="wrong_mode")
            - value(first, refused, instance=km_instance, code="wrong_mode")
            == 1
        )
        assert value(after, "iotdlm_request_seconds_count", instance=km_instance) >= 1

        snap = await watch_json(dep.root)
        rows = {r["name"]: r for r in snap["services"]}
        assert snap["mode"] == "certificate-management"
        assert rows["km"]["health"]["ready"] is True
        assert rows["km"]["health"]["counters"]["refused"] == 1
        assert rows["cm"]["health"]["ready"] is True
        assert rows[f"pm-{DTYPE}"]["health"] is None  # off: not asked

        # km's process stopped (not dead: the supervisor sees it running): no answer, cm not ready
        os.kill(pids["km"], signal.SIGSTOP)
        try:
            snap = await watch_json(dep.root)
            rows = {r["name"]: r for r in snap["services"]}
            assert rows["km"]["health"] is None
            assert rows["km"]["error"]
            assert rows["cm"]["health"]["ready"] is False
            assert "km" in rows["cm"]["health"]["reason"]
            stopped = await asyncio.to_thread(scrape, port)
            assert value(stopped, "iotdlm_scrape_ok", instance=km_instance) == 0
        finally:
            os.kill(pids["km"], signal.SIGCONT)
        await until(lambda: ready("cm"), "cm is ready again once km answers")

        # another mode: cm stops, pm starts; the same /metrics follows without a new target
        await sup.switch(Mode.PROVISIONING_CERTIFICATE, by="test")
        await until(lambda: ready("pm"), "pm says it is ready")
        pm_pid = sup.services()[f"pm-{DTYPE}"].pid
        scrapes: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]] = []

        async def pm_scraped() -> bool:
            # pm answers its health in its queue group first; its per-process metrics subject, asked
            # with a 2 s timeout, may lag on a loaded machine (one CI run scraped it just before)
            scrapes.append(await asyncio.to_thread(scrape, port))
            return value(scrapes[-1], "iotdlm_scrape_ok", instance=f"pm-{pm_pid}") == 1

        await until(pm_scraped, "the supervisor's /metrics to scrape the new pm")
        switched = scrapes[-1]
        assert value(switched, "iotdlm_service_up", service="cm") == 0
        assert value(switched, "iotdlm_mode", module="pm", mode="provisioning-certificate") == 1
    finally:
        await admin.close()
