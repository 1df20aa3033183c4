"""Store pieces that need no database: serial codec, record validation, URL handling."""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotdlm import errors
from iotdlm.store import SerialCollisionError, Store
from iotdlm.store.records import (
    MAX_SERIAL,
    findable_serial,
    findable_text,
    serial_from_hex,
    serial_to_hex,
)
from tests.fixtures_store import make_cert


@given(st.integers(min_value=0, max_value=2**160 - 1))
def test_serial_hex_round_trips_and_is_canonical(serial: int) -> None:
    text = serial_to_hex(serial)
    assert serial_from_hex(text) == serial
    assert text == text.lower()
    assert len(text) <= 40
    assert text == "0" or not text.startswith("0")
    assert findable_serial(serial) == text


@pytest.mark.parametrize("bad", [-1, 2**160, 2**200])
def test_serial_out_of_range_is_refused_for_writes_and_unfindable(bad: int) -> None:
    with pytest.raises(ValueError, match="serial"):
        serial_to_hex(bad)
    assert findable_serial(bad) is None


@pytest.mark.parametrize("bad", [True, "12", 1.0])
def test_serial_of_wrong_type_is_a_programming_error(bad: object) -> None:
    with pytest.raises(ValueError, match="serial must be an int"):
        serial_to_hex(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="serial must be an int"):
        findable_serial(bad)  # type: ignore[arg-type]


def test_max_serial_is_160_bits() -> None:
    assert MAX_SERIAL.bit_length() == 160
    assert serial_to_hex(MAX_SERIAL) == "f" * 40


def test_findable_text() -> None:
    assert findable_text("abc", 3)
    assert not findable_text("abcd", 3)
    assert not findable_text("a\x00b", 10)


def test_cert_record_refuses_naive_datetime() -> None:
    good = make_cert(1)
    with pytest.raises(ValueError, match="created_at must be timezone-aware"):
        dataclasses.replace(good, created_at=dt.datetime(2025, 1, 1))  # a naive datetime is the point


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"status": "bogus"}, "certificate status"),
        ({"device_id": "a\x00b"}, "device_id must not contain NUL"),
        ({"issuer": "x" * 1025}, "issuer is 1025 characters long"),
        ({"fingerprint": "ab"}, "fingerprint must be 64"),
        ({"serial": -5}, "serial must be in"),
        ({"superseded_by": 2**160}, "serial must be in"),
    ],
)
def test_cert_record_validates(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(make_cert(1), **change)  # type: ignore[arg-type]


def test_serial_collision_error_is_a_conflict_and_survives_the_wire() -> None:
    err = SerialCollisionError("taken", field="serial", issuer="CN=x", serial=5)
    assert isinstance(err, errors.ConflictError)
    assert err.code == "serial_collision"
    again = errors.from_wire(err.to_wire())
    assert type(again) is SerialCollisionError
    assert again.message == "taken"


@pytest.mark.parametrize(
    "url",
    ["sqlite://", "sqlite:///:memory:", "mysql://u@h/db", "postgresql+asyncpg://u@h/db", "not a url"],
)
def test_open_refuses_unsupported_urls(url: str) -> None:
    with pytest.raises(ValueError, match=r"in-memory|unsupported|not a database URL"):
        Store.open(url)


def _closed_port() -> int:
    """A loopback port nothing listens on (bound then released; nobody else should grab it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_unreachable_postgres_is_unavailable_and_names_the_url_without_password() -> None:
    port = _closed_port()
    url = f"postgresql+psycopg://x:s3cr3t@127.0.0.1:{port}/x?connect_timeout=2"
    with pytest.raises(errors.UnavailableError) as info:
        Store.open(url)
    message = info.value.message
    assert f"postgresql+psycopg://x:***@127.0.0.1:{port}/x" in message
    assert "s3cr3t" not in message
    assert "Check that PostgreSQL is running" in message
    assert info.value.__cause__ is not None  # raised from the driver error, for the logs


def test_port_1_on_loopback_is_unavailable() -> None:
    with pytest.raises(errors.UnavailableError, match=r"127\.0\.0\.1:1"):
        Store.open("postgresql+psycopg://x@127.0.0.1:1/x?connect_timeout=2")


def test_sqlite_in_a_missing_directory_is_unavailable_and_says_which(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(errors.UnavailableError) as info:
        Store.open(f"sqlite:///{missing}/store.db")
    assert str(missing) in info.value.message
    assert "exists and is writable" in info.value.message


def test_plain_postgresql_scheme_means_psycopg() -> None:
    # The default driver of postgresql:// would be psycopg2, which is not installed; the error
    # must be about reaching the server, not about a missing module.
    with pytest.raises(errors.UnavailableError, match=r"postgresql\+psycopg://x@127.0.0.1:1/x"):
        Store.open("postgresql://x@127.0.0.1:1/x?connect_timeout=2")


def test_a_file_that_is_not_sqlite_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"this is not a database, just some text " * 100)
    with pytest.raises(errors.UnavailableError, match="not a database"):
        Store.open(f"sqlite:///{path}")
