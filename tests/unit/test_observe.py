"""Metrics and health of one module process, on the in-memory bus: the counters, the merge of
several processes' expositions (and what it refuses), the health reply's codec, the instrumented
bus. Over the real nats-server: tests/integration/test_observe.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from iotdlm import errors
from iotdlm.bus import subjects as s
from iotdlm.bus.api import Message
from iotdlm.bus.memory import MemoryHub
from iotdlm.errors import BadRequestError, ModeError
from iotdlm.modes.table import Mode
from iotdlm.observe import ModuleMetrics, Observer, merge_expositions
from iotdlm.observe.gather import check_loopback, start_listener
from iotdlm.observe.serve import InstrumentedBus, mode_ready, operation
from iotdlm.wire import health as h
from iotdlm.wire import km as msg


def samples(text: bytes, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for smp in family.samples:
            if smp.name == name:
                out[tuple(sorted(smp.labels.items()))] = smp.value
    return out


def _cert(profile: str) -> msg.IssuedCertificate:
    return msg.IssuedCertificate(
        serial="ab", issuer="factory", profile=profile, device_id="d", not_after="2030-01-01T00:00:00Z", certificate=b""
    )


# --- the counters --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (_cert("factory"), {"factory": 1}),
        (msg.EstResponse(certificate=_cert("operational")), {"operational": 1}),
        (
            msg.BatchIssueResponse(
                results=[
                    msg.ItemResult(device_id="a", certificate=_cert("factory")),
                    msg.ItemResult(device_id="b", error=msg.ErrorInfo(code="rejected", message="no")),
                    msg.ItemResult(device_id="c", certificate=_cert("factory")),
                ]
            ),
            {"factory": 2},
        ),
        (msg.ChainResponse(root=b"", chains={}), {}),  # not an issuance: nothing counted
    ],
    ids=["issue", "est", "batch-with-a-refused-item", "chain"],
)
def test_issued_from_counts_by_profile(result: object, expected: dict[str, int]) -> None:
    m = ModuleMetrics("km", pid=7)
    m.issued_from(result, 0.01)
    got = samples(m.exposition(), "iotdlm_certificates_issued_total")
    assert {dict(k)["profile"]: v for k, v in got.items()} == expected
    for labels in got:
        assert dict(labels)["instance"] == "km-7"
        assert dict(labels)["module"] == "km"


def test_exposition_leaves_out_created_series_and_mode_is_one_hot() -> None:
    m = ModuleMetrics("cm", pid=1)
    m.refused("bad_request")
    m.set_mode("software-management")
    m.set_mode("certificate-management")
    text = m.exposition()
    assert b"_created" not in text
    modes = {dict(k)["mode"]: v for k, v in samples(text, "iotdlm_mode").items()}
    assert modes == {"software-management": 0, "certificate-management": 1}


# --- merging several processes ---------------------------------------------------------------------
def test_merge_keeps_every_instance_under_one_family() -> None:
    a, b = ModuleMetrics("pm", pid=1), ModuleMetrics("pm", pid=2)
    a.refused("mode")
    b.refused("mode")
    b.refused("mode")
    merged = merge_expositions([a.exposition(), b.exposition()])
    assert merged.decode().count("# TYPE iotdlm_refusals_total counter") == 1
    got = {dict(k)["instance"]: v for k, v in samples(merged, "iotdlm_refusals_total").items()}
    assert got == {"pm-1": 1, "pm-2": 2}


@pytest.mark.parametrize(
    ("parts", "needle"),
    [
        ([b"# TYPE x counter\nx_total 1\n", b"# TYPE x gauge\nx 1\n"], "is a counter in one part and a gauge"),
        ([b"not { a metric"], "part 1, line 1: not a sample line"),
        ([b"# TYPE ok gauge\nok 1\n", b"\xff\xfe"], "part 2 is not UTF-8"),
        ([b"# TYPE ok gauge\nok 1\n", b"# TYPE ok gauge\nok one\n"], "part 2, line 2: 'one' is not a number"),
        ([b"# TYPE ok sometimes\n"], "unknown metric type"),
        ([b"# HELP 9lives x\n"], "is not a metric name"),
        ([b'ok{a="unterminated} 1\n'], "not a sample line"),
        ([b"x" * (1024 * 1024 + 1)], "over"),
    ],
    ids=["type-clash", "garbage", "not-utf8", "not-a-number", "bad-type", "bad-name", "bad-label", "too-big"],
)
def test_merge_refuses_what_is_not_an_exposition(parts: list[bytes], needle: str) -> None:
    with pytest.raises(BadRequestError, match=needle):
        merge_expositions(parts)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=3))
def test_merge_of_any_bytes_is_an_exposition_or_a_clear_refusal(parts: list[bytes]) -> None:
    try:
        out = merge_expositions(parts)
    except BadRequestError as exc:
        field = exc.field
    else:
        list(text_string_to_metric_families(out.decode()))  # what it serves parses again
        return
    assert field == "metrics"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.dictionaries(st.text(min_size=1, max_size=12), st.integers(min_value=1, max_value=5), max_size=4),
        min_size=1,
        max_size=4,
    )
)
def test_merge_keeps_every_sample_whatever_the_label_values(refusals: list[dict[str, int]]) -> None:
    """Label values with quotes, backslashes, line breaks, any Unicode: every sample of every
    process comes out once, with its value, and Prometheus's own parser reads the result."""
    parts = []
    for pid, codes in enumerate(refusals):
        m = ModuleMetrics("pm", pid=pid)
        for code, times in codes.items():
            for _ in range(times):
                m.refused(code)
        parts.append(m.exposition())
    merged = merge_expositions(parts)
    got = {(dict(k)["instance"], dict(k)["code"]): v for k, v in samples(merged, "iotdlm_refusals_total").items()}
    want = {(f"pm-{pid}", code): times for pid, codes in enumerate(refusals) for code, times in codes.items()}
    assert got == want


# --- the health reply ------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_health_decode_never_crashes(data: bytes) -> None:
    try:
        h.decode(data)
    except BadRequestError as exc:
        field = exc.field
    else:
        return
    assert field == "health"


@settings(max_examples=100, deadline=None)
@given(
    st.builds(
        h.Health,
        module=st.sampled_from(["km", "pm", "sm", "cm"]),
        instance=st.text(max_size=20),
        pid=st.integers(min_value=1, max_value=2**22),
        ready=st.booleans(),
        reason=st.text(max_size=80),
        mode=st.one_of(st.none(), st.sampled_from([m.value for m in Mode])),
        version=st.just("0.1.0"),
        uptime_seconds=st.floats(min_value=0, max_value=1e9),
        in_flight=st.integers(min_value=0, max_value=10_000),
        counters=st.dictionaries(st.sampled_from(["issued", "refused"]), st.floats(min_value=0, max_value=1e12)),
    )
)
def test_health_round_trips(health: h.Health) -> None:
    assert h.decode(h.encode(health)) == health


def test_health_decode_refuses_a_huge_reply() -> None:
    with pytest.raises(BadRequestError, match="over"):
        h.decode(b" " * (h.MAX_HEALTH + 1))


# --- on the bus --------------------------------------------------------------------------------
class _Mode:
    def __init__(self, mode: str | None) -> None:
        self.mode = mode

    def require(self, allowed_modes: object, what: str) -> str:
        if self.mode is None or self.mode not in allowed_modes:  # type: ignore[operator]
            raise ModeError(f"km refuses {what} in mode {self.mode}", field="mode")
        return self.mode


async def test_instrumented_bus_times_requests_and_counts_refusals() -> None:
    hub = MemoryHub()
    metrics = ModuleMetrics("km", pid=5)
    km = InstrumentedBus(hub.bus("km"), metrics)
    admin = hub.bus("admin")

    async def answer(m: Message) -> bytes:
        if m.data == b"no":
            raise errors.NotAuthorizedError("not you")
        return b"ok"

    await km.serve(s.KM_CHAIN, answer)
    assert await admin.request(s.KM_CHAIN, b"") == b"ok"
    with pytest.raises(errors.NotAuthorizedError):
        await admin.request(s.KM_CHAIN, b"no")
    text = metrics.exposition()
    count = samples(text, "iotdlm_request_seconds_count")
    assert {dict(k)["operation"]: v for k, v in count.items()} == {operation(s.KM_CHAIN): 2}
    assert {dict(k)["code"]: v for k, v in samples(text, "iotdlm_refusals_total").items()} == {"not_authorized": 1}
    assert samples(text, "iotdlm_requests_in_flight") == {(("instance", "km-5"), ("module", "km")): 0}


async def test_observer_answers_on_the_module_subject_and_on_its_pid() -> None:
    hub = MemoryHub()
    mode = _Mode(Mode.SOFTWARE_MANAGEMENT)
    bus = hub.bus("km")
    obs = Observer(bus, ModuleMetrics("km", pid=31), mode=mode)
    await obs.start()
    admin = hub.bus("admin")
    any_one = h.decode(await admin.request(s.health_subject("km"), b""))
    this_one = h.decode(await admin.request(f"{s.health_subject('km')}.31", b""))
    assert any_one.instance == this_one.instance == "km-31"
    # km does not run in software-management (Table 1): alive, not ready, saying why
    assert (this_one.ready, this_one.mode) == (False, "software-management")
    assert "software-management" in this_one.reason
    mode.mode = Mode.CERTIFICATE_MANAGEMENT
    assert h.decode(await admin.request(s.health_subject("km"), b"")).ready
    text = await admin.request(f"{s.metrics_subject('km')}.31", b"")
    assert samples(text, "iotdlm_ready") == {(("instance", "km-31"), ("module", "km")): 1}
    await obs.stop()
    with pytest.raises(errors.UnavailableError):
        await admin.request(s.health_subject("km"), b"", timeout=0.5)


async def test_mode_ready_says_unknown_mode() -> None:
    hub = MemoryHub()
    ready, reason = await mode_ready(hub.bus("sm"), _Mode(None), "sm")()
    assert not ready
    assert "mode" in reason


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.4", "example.com", "::"])  # noqa: S104 - refused hosts
def test_the_metrics_listener_is_loopback_only(host: str) -> None:
    with pytest.raises(BadRequestError, match="loopback"):
        check_loopback(host)


async def test_a_taken_metrics_port_is_logged_and_the_rest_runs(caplog: pytest.LogCaptureFixture) -> None:
    hub = MemoryHub()
    holder = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = holder.sockets[0].getsockname()[1]
    try:
        assert await start_listener(hub.bus("modes"), list, port=port) is None
    finally:
        holder.close()
        await holder.wait_closed()
    assert f"127.0.0.1:{port}" in caplog.text
    assert "in use" in caplog.text
    assert await start_listener(hub.bus("modes"), list, port=0) is None  # 0: off


def test_health_struct_ignores_unknown_fields() -> None:
    body = msgspec.json.encode(
        {"module": "sm", "instance": "sm-1", "pid": 1, "ready": True, "reason": "", "mode": None}
        | {"version": "9", "uptime_seconds": 1.0, "from_the_future": 1}
    )
    assert h.decode(body).module == "sm"


# --- iotdlm status --watch ----------------------------------------------------------------------
def test_watch_view_shows_ready_not_ready_off_and_silent_services() -> None:
    from rich.console import Console

    from iotdlm.cli.watch import render

    health = msgspec.to_builtins(
        h.Health(
            module="km",
            instance="km-9",
            pid=9,
            ready=True,
            reason="",
            mode="certificate-management",
            version="0.1.0",
            uptime_seconds=3.0,
            in_flight=2,
            mean_request_seconds=0.0042,
            counters={"issued": 17, "refused": 3},
        )
    )
    cm = dict(health, module="cm", ready=False, reason="km does not answer: timeout", mean_request_seconds=None)
    rows = [
        {"name": "km", "pid": 9, "state": "running", "health": health, "error": None},
        {"name": "cm", "pid": 10, "state": "running", "health": cm, "error": None},
        {"name": "sm", "pid": None, "state": "off", "health": None, "error": None},
        {"name": "pm-a", "pid": 11, "state": "running", "health": None, "error": "no answer within 2 s"},
    ]
    out = Console(width=200, record=True)
    out.print(render({"mode": "certificate-management", "switching": None, "services": rows}))
    text = out.export_text()
    lines = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("\u2502")]
        if len(cells) > 2 and cells[1] in ("km", "cm", "sm", "pm-a"):
            lines[cells[1]] = line
    assert "yes" in lines["km"]
    assert "17" in lines["km"]
    assert "4.2" in lines["km"]  # mean latency in ms
    assert "km does not answer" in lines["cm"]
    assert "off" in lines["sm"]
    assert "no answer" in lines["pm-a"]
    assert "Ctrl-C" in text


def test_status_watch_without_a_supervisor_says_what_to_do(tmp_path: Path) -> None:
    import subprocess
    import sys

    from iotdlm.bus.server import free_port
    from iotdlm.clock import SystemClock
    from iotdlm.deployment import init_deployment
    from iotdlm.pki.keys import Algorithm

    made, _ = init_deployment(
        tmp_path / "site",
        organization="T",
        algorithm=Algorithm.P256,
        dtypes=["a"],
        passphrase=b"pw",
        nats_port=free_port(),
        now=SystemClock().now(),
    )
    r = subprocess.run(
        [sys.executable, "-m", "iotdlm.cli.main", "status", "--data", str(made.root), "--watch"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 3, r.stdout + r.stderr
    assert "no supervisor runs" in r.stderr
    assert "iotdlm up --data" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr
