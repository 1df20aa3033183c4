"""Health, readiness and metrics over the real nats-server with a real km and cm (issue 14,
docs/adr/0018): counters move after an issuance, cm's /ready says no when km stops, and a module's
stolen login cannot answer another module's health or metrics."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from iotdlm.bus import subjects as s
from iotdlm.errors import IotdlmError, PermissionDeniedError, UnavailableError
from iotdlm.observe import ModuleMetrics, Observer
from iotdlm.observe.gather import Gatherer, MetricsListener, Target
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.wire import health as h
from tests.helpers import make_csr
from tests.integration.test_cm import Site, open_site

pytestmark = pytest.mark.nats


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[tuple[Site, Observer]]:
    """test_cm's site (nats-server, km, cm), km keeping metrics and answering its health as
    `iotdlm km serve` does."""
    async with open_site(tmp_path) as st:
        metrics = ModuleMetrics("km")
        st.km.metrics = metrics
        assert st.km.km.mode is None  # the harness's km runs without a guard: always ready
        observer = Observer(st.km.bus, metrics)
        await observer.start()
        try:
            yield st, observer
        finally:
            await observer.stop()


def sample(text: bytes, name: str, **labels: str) -> float:
    """The value of sample ``name`` with ``labels`` (0 when absent)."""
    for family in text_string_to_metric_families(text.decode()):
        for smp in family.samples:
            if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items()):
                return float(smp.value)
    return 0.0


def _get(url: str) -> tuple[int, dict[str, object]]:
    """GET over HTTPS without a client certificate, as a load balancer's probe would."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the probe checks the answer, not cm's name
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=10) as r:  # noqa: S310 - https to loopback
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def test_km_issuance_moves_its_counters_over_the_bus(site: tuple[Site, Observer]) -> None:
    st, _ = site
    admin = await st.nats.connect("admin")
    st.buses.append(admin)
    before = await admin.request(s.metrics_subject("km"), b"")
    await st.factory("dev-m1")
    await st.factory("dev-m2")
    after = await admin.request(s.metrics_subject("km"), b"")
    name = "iotdlm_certificates_issued_total"
    assert sample(after, name, profile="factory", module="km") - sample(before, name, profile="factory") == 2
    assert sample(after, "iotdlm_issue_seconds_count", profile="factory") == 2
    # every sample names its process: the instance label
    assert 'instance="km-' in after.decode()
    # a refusal counts by its code: pm asks for a profile its RA rule does not grant
    pm = await st.client("pm-boardA")
    with pytest.raises(IotdlmError) as refusal:
        await pm.issue("dev-m3", "service", csr=make_csr(generate_key(Algorithm.P256), "dev-m3"))
    refused = await admin.request(s.metrics_subject("km"), b"")
    assert sample(refused, "iotdlm_refusals_total", code=refusal.value.code) == 1
    health = h.decode(await admin.request(s.health_subject("km"), b""))
    assert (health.module, health.ready, health.counters["issued"]) == ("km", True, 2)


@pytest.mark.real_clock
async def test_cm_health_and_ready_over_https_and_not_ready_without_km(site: tuple[Site, Observer]) -> None:
    st, km_observer = site
    status, body = await _get_async(f"{st.https}/health")
    assert (status, body["status"]) == (200, "ok")
    status, body = await _get_async(f"{st.https}/ready")
    assert (status, body["ready"], body["mode"]) == (200, True, "certificate-management")
    admin = await st.nats.connect("admin")
    st.buses.append(admin)
    assert h.decode(await admin.request(s.health_subject("cm"), b"")).ready

    # km stops: liveness still yes, readiness no, saying why
    await km_observer.stop()
    await st.km.stop()
    status, body = await _get_async(f"{st.https}/health")
    assert status == 200
    status, body = await _get_async(f"{st.https}/ready")
    assert status == 503
    assert body["ready"] is False
    assert "km does not answer" in str(body["reason"])
    cm_health = h.decode(await admin.request(s.health_subject("cm"), b""))
    assert not cm_health.ready
    assert "km" in cm_health.reason
    # the http counter saw both answers, by route pattern and status
    text = await admin.request(s.metrics_subject("cm"), b"")
    assert sample(text, "iotdlm_http_requests_total", route="/ready", status="503") == 1
    assert sample(text, "iotdlm_http_requests_total", route="/ready", status="200") == 1


async def _get_async(url: str) -> tuple[int, dict[str, object]]:
    import asyncio

    return await asyncio.to_thread(_get, url)


@pytest.mark.parametrize("thief", ["pm", "sm", "cm"])
async def test_attack_a_module_login_cannot_answer_another_modules_health(
    site: tuple[Site, Observer], thief: str
) -> None:
    """A stolen login (real credentials, the real nats-server) tries to answer km's health and
    metrics -- to say "ready" for a dead km, or feed Prometheus forged numbers -- and is refused."""
    st, _ = site
    bus = await st.nats.connect(thief)
    st.buses.append(bus)

    async def forged(_m: object) -> bytes:
        return b"{}"

    for subject in (s.health_subject("km"), f"{s.metrics_subject('km')}.1", f"{s.health_subject('modes')}"):
        with pytest.raises(PermissionDeniedError):
            await bus.serve(subject, forged)  # type: ignore[arg-type]
    other = next(m for m in ("pm", "sm", "cm") if m != thief)
    with pytest.raises(PermissionDeniedError):
        await bus.serve(s.metrics_subject(other), forged)  # type: ignore[arg-type]
    # its own it may serve (cm's is taken by the real cm: it joins beside it, outside the queue)
    own = await bus.serve(f"{s.health_subject(thief)}.999999", forged)  # type: ignore[arg-type]
    await own.unsubscribe()


async def test_the_supervisors_metrics_gathers_every_process(site: tuple[Site, Observer]) -> None:
    """Two pm processes (two pids) and km answer on the bus; the supervisor's loopback /metrics
    serves them merged, each under its instance, and says which did not answer."""
    st, _ = site
    pms = []
    for pid in (101, 102):
        bus = await st.nats.connect("pm")
        st.buses.append(bus)
        metrics = ModuleMetrics("pm", pid=pid)
        metrics.refused("mode")
        obs = Observer(bus, metrics)
        await obs.start()
        pms.append(obs)
    modes = await st.nats.connect("modes")
    st.buses.append(modes)
    km_pid = int(st.km.metrics.instance.rsplit("-", 1)[1])  # type: ignore[union-attr]
    targets = [
        Target("km", "km", km_pid),
        Target("pm-a", "pm", 101),
        Target("pm-b", "pm", 102, restarts=3),
        Target("pm-gone", "pm", 4242),  # its process does not answer
        Target("sm", "sm", None),  # off in this mode
    ]
    listener = MetricsListener(Gatherer(modes, lambda: targets, timeout=1.0), port=0)
    await listener.start()
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{listener.port}/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await r.read()
    finally:
        await listener.stop()
        for obs in pms:
            await obs.stop()
    assert sample(text, "iotdlm_refusals_total", instance="pm-101", code="mode") == 1
    assert sample(text, "iotdlm_refusals_total", instance="pm-102", code="mode") == 1
    assert sample(text, "iotdlm_scrape_ok", instance=f"km-{km_pid}") == 1
    assert sample(text, "iotdlm_scrape_ok", instance="pm-4242") == 0
    assert sample(text, "iotdlm_service_up", service="sm") == 0
    assert sample(text, "iotdlm_service_restarts", service="pm-b") == 3
    # one HELP/TYPE per family, however many processes answered
    assert text.decode().count("# TYPE iotdlm_refusals_total counter") == 1


async def test_health_of_a_module_nobody_runs_is_unavailable(site: tuple[Site, Observer]) -> None:
    st, _ = site
    admin = await st.nats.connect("admin")
    st.buses.append(admin)
    with pytest.raises(UnavailableError):
        await admin.request(s.health_subject("sm"), b"", timeout=1.0)
