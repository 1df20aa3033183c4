"""Plain NATS only to loopback (issue 11, section 4.2; ADR 0007): refused at config load and at
connect, before any connection is tried, unless ``[nats] allow_plain = true`` (then a warning)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm.bus.nats import connect
from iotdlm.bus.urls import FIX, check_nats_url, is_loopback
from iotdlm.deployment import CONFIG_FILE, Deployment
from iotdlm.errors import BadRequestError, IotdlmError, UnavailableError


@pytest.mark.parametrize(
    "url",
    [
        "nats://127.0.0.1:4222",
        "nats://127.8.9.10:4222",
        "nats://[::1]:4222",
        "nats://localhost:4222",
        "nats://LOCALHOST.:4222",
        "127.0.0.1:4222",
        "tls://nats.example.com:4222",
        "tls://10.0.0.5:4222",
        "wss://nats.example.com",
    ],
)
def test_accepted(url: str) -> None:
    assert check_nats_url(url) is False


@pytest.mark.parametrize(
    "url",
    [
        "nats://10.0.0.5:4222",
        "nats://nats.example.com:4222",
        "nats://[2001:db8::1]:4222",
        "nats://0.0.0.0:4222",
        "nats.example.com:4222",
        "ws://nats.example.com",
        "nats://localhost.example.com:4222",
        "nats://127.0.0.1.nip.io:4222",
    ],
)
def test_plain_to_another_host_refused_with_the_fix(url: str) -> None:
    with pytest.raises(BadRequestError) as exc:
        check_nats_url(url)
    assert FIX in exc.value.message
    assert "plain NATS to" in exc.value.message
    assert check_nats_url(url, allow_plain=True) is True


@pytest.mark.parametrize("url", ["", "http://10.0.0.5", "nats://", "nats://host:99999", "nats://[::1"])
def test_malformed_urls_are_clear_errors(url: str) -> None:
    with pytest.raises(BadRequestError, match="NATS URL"):
        check_nats_url(url)


def test_loopback() -> None:
    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert not is_loopback("::ffff:10.0.0.1")
    assert not is_loopback("example.com")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_check_never_crashes(url: str) -> None:
    with contextlib.suppress(IotdlmError):
        check_nats_url(url)


async def test_connect_refuses_plain_to_another_host_before_connecting() -> None:
    """192.0.2.1 (TEST-NET-1) is unroutable: a connection attempt would be UnavailableError after
    the timeout; the refusal is a BadRequestError at once."""
    with pytest.raises(BadRequestError, match="allow_plain = true"):
        await connect("nats://192.0.2.1:4222", module="sm", connect_timeout=0.5)


async def test_connect_with_allow_plain_warns_then_tries(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="iotdlm.bus.nats")
    with pytest.raises(UnavailableError):
        await connect("nats://192.0.2.1:4222", module="sm", connect_timeout=0.3, allow_plain=True)
    assert "WITHOUT TLS" in caplog.text
    assert "192.0.2.1" in caplog.text


def _config_with(site: Path, tmp: Path, nats: str) -> Path:
    text = (site / CONFIG_FILE).read_text()
    d = tmp / "d"
    d.mkdir()
    (d / CONFIG_FILE).write_text(text + "\n" + nats if "[nats]" not in text else text.replace("[nats]", nats, 1))
    return d


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from click.testing import CliRunner

    from iotdlm.cli.main import main

    data = tmp_path_factory.mktemp("site") / "data"
    r = CliRunner().invoke(main, ["init", "--data", str(data), "--dtype", "boardA"], env={})
    assert r.exit_code == 0, r.output
    return data


def test_config_load_refuses_plain_url_to_another_host(site: Path, tmp_path: Path) -> None:
    d = _config_with(site, tmp_path, '[nats]\nurl = "nats://nats.example.com:4222"\n')
    with pytest.raises(BadRequestError, match=r"use tls:// and \[nats\] tls = true"):
        Deployment.load(d)


def test_config_load_accepts_allow_plain_and_tls(site: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    d = _config_with(site, tmp_path / "a", '[nats]\nurl = "nats://nats.example.com:4222"\nallow_plain = true\n')
    assert Deployment.load(d).config.nats.allow_plain
    (tmp_path / "b").mkdir()
    d = _config_with(site, tmp_path / "b", '[nats]\nurl = "tls://nats.example.com:4222"\ntls = true\n')
    assert Deployment.load(d).nats_url == "tls://nats.example.com:4222"
