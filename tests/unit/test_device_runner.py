"""The device loop without a network: its schedule, and transfer messages handed to the transfer
agent once (fakes for cm's message route and the agent)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotdlm.clock import FixedClock
from iotdlm.device.runner import DeviceRunner, base_url_of
from iotdlm.device.simulated import SimulatedDevice
from iotdlm.errors import UnavailableError
from tests.helpers import NOW
from tests.unit.test_transfer_agent import make_device


@dataclass(frozen=True)
class Receipt:
    accepted: bool
    phase: str
    detail: str = ""


class Agent:
    def __init__(self) -> None:
        self.handled: list[bytes] = []
        self.resumed = 0

    async def handle(self, token: bytes) -> Receipt:
        self.handled.append(token)
        return Receipt(True, "committed")

    async def resume(self) -> object:
        self.resumed += 1
        return None


class Messages:
    def __init__(self, *answers: bytes | Exception | None) -> None:
        self.answers = list(answers)
        self.urls: list[str] = []

    async def fetch(self, dev: SimulatedDevice, base_url: str) -> bytes | None:
        self.urls.append(base_url)
        answer = self.answers.pop(0) if self.answers else None
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_a_transfer_message_is_handed_to_the_agent_once(tmp_path: Path) -> None:
    dev = make_device(tmp_path)
    agent, messages = Agent(), Messages(None, b"m1", b"m1", UnavailableError("cm is down"), b"m2")
    runner = DeviceRunner(dev, clock=FixedClock(NOW), transfers=agent, messages=messages)
    reports = [await runner.tick() for _ in range(5)]
    assert agent.handled == [b"m1", b"m2"]
    assert agent.resumed == 5
    assert [r.actions for r in reports] == [[], ["transfer-committed"], [], [], ["transfer-committed"]]
    assert "cm is down" in reports[3].errors[0]
    assert messages.urls == ["https://ca1"] * 5
    assert [e["event"] for e in dev.events()].count("transfer_message_none") == 1  # said once
    # a new runner (the device restarted) remembers what it handed over
    again = DeviceRunner(dev, clock=FixedClock(NOW), transfers=agent, messages=Messages(b"m1"))
    await again.tick()
    assert agent.handled == [b"m1", b"m2"]


@pytest.mark.parametrize(
    ("after", "wanted"),
    [
        ("before_not_before", "simpleenroll"),
        ("start", None),
        ("just_before_due", None),
        ("due", "simplereenroll"),
        ("expired", "simpleenroll"),
    ],
)
def test_the_schedule(tmp_path: Path, after: str, wanted: str | None) -> None:
    dev = make_device(tmp_path)
    op = dev.certificate("operational")
    assert op is not None
    runner = DeviceRunner(dev, clock=FixedClock(NOW), renew_at=0.75)
    due = runner.renewal_due(op)
    at = {
        "before_not_before": op.not_valid_before_utc - dt.timedelta(seconds=1),
        "start": op.not_valid_before_utc,
        "just_before_due": due - dt.timedelta(seconds=1),
        "due": due,
        "expired": op.not_valid_after_utc,
    }[after]
    assert runner.needs(at) == wanted


def test_no_operational_certificate_means_enroll_and_bad_settings_are_refused(tmp_path: Path) -> None:
    dev = SimulatedDevice.manufacture(tmp_path / "blank", "blank", "sensor")
    assert DeviceRunner(dev, clock=FixedClock(NOW)).needs(NOW) == "simpleenroll"
    with pytest.raises(ValueError, match="fraction"):
        DeviceRunner(dev, clock=FixedClock(NOW), renew_at=1.0)


@pytest.mark.parametrize(
    ("uri", "base"),
    [
        ("https://cm:8443/.well-known/est", "https://cm:8443"),
        ("https://cm:8443/.well-known/est/", "https://cm:8443"),
        ("https://cm:8443", "https://cm:8443"),
    ],
)
def test_base_url_of(uri: str, base: str) -> None:
    assert base_url_of(uri) == base


@given(st.text(max_size=80))
def test_base_url_of_any_text_strips_only_the_est_path(text: str) -> None:
    base = base_url_of(text)
    assert text.rstrip("/").startswith(base)
    assert base_url_of(text.rstrip("/") + "/.well-known/est") == text.rstrip("/")


async def test_a_device_without_truststore_or_ca_uri_reports_in_words(tmp_path: Path) -> None:
    dev = make_device(tmp_path)
    dev.write_truststore([])
    runner = DeviceRunner(dev, clock=FixedClock(NOW))
    report = await runner.tick()  # not due: nothing asked of the network
    assert report.errors == []
    op = dev.certificate("operational")
    assert op is not None
    report = await DeviceRunner(dev, clock=FixedClock(op.not_valid_after_utc)).tick()
    assert report.errors[0] == (
        "simpleenroll: not_found: device d1 has an empty truststore: it cannot authenticate its cm"
    )
    assert not dev.has_key("pending")
    dev.write_config({"device_id": dev.device_id})
    report = await DeviceRunner(dev, clock=FixedClock(op.not_valid_after_utc)).tick()
    assert "give --cm URL" in report.errors[0]
