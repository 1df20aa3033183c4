"""The operator's output helpers (iotdlm.cli.output): serials read in every spelling openssl and
our tables print (issue 14, stumble 4), tables that fit 80 columns without cutting a serial, and
output paths checked before the work (stumble 9)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from iotdlm.cli.output import (
    MAX_SERIAL,
    Column,
    check_out_dir,
    check_out_file,
    fit_table,
    iso_utc,
    parse_serial,
    write_after_work,
)
from iotdlm.errors import BadRequestError

SERIAL = 0x67FD15F33CC7328A04D6EB97A8E1AABBCCDDEEFF


def _colons(value: int, *, upper: bool) -> str:
    text = format(value, "x")
    text = text if len(text) % 2 == 0 else "0" + text
    pairs = ":".join(text[i : i + 2] for i in range(0, len(text), 2))
    return pairs.upper() if upper else pairs


@pytest.mark.parametrize(
    "text",
    [
        "67fd15f33cc7328a04d6eb97a8e1aabbccddeeff",
        "67FD15F33CC7328A04D6EB97A8E1AABBCCDDEEFF",
        "0x67fd15f33cc7328a04d6eb97a8e1aabbccddeeff",
        "0X67FD15F33CC7328A04D6EB97A8E1AABBCCDDEEFF",
        "67:fd:15:f3:3c:c7:32:8a:04:d6:eb:97:a8:e1:aa:bb:cc:dd:ee:ff",
        "67:FD:15:F3:3C:C7:32:8A:04:D6:EB:97:A8:E1:AA:BB:CC:DD:EE:FF",
        "  67:fd:15:f3:3c:c7:32:8a:04:d6:eb:97:a8:e1:aa:bb:cc:dd:ee:ff\n",
        "serial=67FD15F33CC7328A04D6EB97A8E1AABBCCDDEEFF",
    ],
    ids=["table", "upper", "0x", "0X-upper", "openssl-text-lower", "openssl-text", "padded", "openssl-serial"],
)
def test_every_spelling_of_a_serial(text: str) -> None:
    assert parse_serial(text) == SERIAL


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "not a certificate serial"),
        ("zz-not-hex", "not a certificate serial"),
        ("67fd15f33cc7328a04d6eb97a8e1…", "not a certificate serial"),  # a cut serial from an old table
        ("67::fd", "not a certificate serial"),
        (":67:fd", "not a certificate serial"),
        ("67:fd:", "not a certificate serial"),
        ("67 fd 15", "not a certificate serial"),
        ("-1", "not a certificate serial"),
        ("0x", "not a certificate serial"),
        ("0", "out of range"),
        ("00:00", "out of range"),
        ("1" + "0" * 40, "at most 20 bytes"),
    ],
    ids=["empty", "letters", "ellipsis", "double-colon", "leading-colon", "trailing-colon", "spaces", "negative",
         "bare-0x", "zero", "zero-colons", "21-bytes"],
)  # fmt: skip
def test_refusals_say_what_to_give(text: str, words: str) -> None:
    with pytest.raises(BadRequestError) as e:
        parse_serial(text)
    assert words in e.value.message
    assert e.value.field == "serial"


@given(st.integers(1, MAX_SERIAL - 1), st.booleans(), st.sampled_from(["plain", "0x", "colons", "serial="]))
def test_any_serial_round_trips_in_any_spelling(value: int, upper: bool, form: str) -> None:
    hexed = format(value, "X" if upper else "x")
    text = {"plain": hexed, "0x": "0x" + hexed, "colons": _colons(value, upper=upper), "serial=": "serial=" + hexed}
    assert parse_serial(text[form]) == value


@given(st.text(max_size=120))
def test_any_text_is_a_serial_or_a_clear_refusal(text: str) -> None:
    try:
        value = parse_serial(text)
    except BadRequestError as exc:
        refusal: BadRequestError | None = exc
    else:
        refusal = None
        assert 0 < value < MAX_SERIAL
    if refusal is not None:
        assert refusal.field == "serial"
        assert len(refusal.message) < 400  # a long input is shortened in the message


def _render(table: object, width: int) -> list[str]:
    c = Console(file=io.StringIO(), width=width, color_system=None)
    c.print(table)
    out = c.file.getvalue()  # type: ignore[attr-defined]
    return str(out).splitlines()


def test_a_narrow_table_leaves_out_columns_not_serials() -> None:
    serial = format(SERIAL, "x")
    columns = (Column("serial", whole=True), Column("status"), Column("requested by", drop=2), Column("issuer", drop=1))
    rows = [[serial, "valid", "admin (local CLI) on a long host name", "operational"]] * 3
    table, hidden = fit_table(columns, rows, 70)
    lines = _render(table, 70)
    assert hidden == ["requested by"]
    assert all(len(line) <= 70 for line in lines)
    assert sum(serial in line for line in lines) == 3
    wide, none_hidden = fit_table(columns, rows, 200)
    assert none_hidden == []
    assert any("admin (local CLI) on a long host name" in line for line in _render(wide, 200))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, MAX_SERIAL - 1), st.text("abc xyz-", max_size=60)), min_size=1, max_size=5),
    st.integers(60, 160),
)
def test_fitted_tables_keep_serials_whole_and_fit(rows: list[tuple[int, str]], width: int) -> None:
    columns = (
        Column("serial", whole=True),
        Column("device", whole=True),
        Column("detail", drop=1),
        Column("more", drop=2),
    )
    cells = [[format(s, "x"), "boardA-00001", d, d] for s, d in rows]
    table, _hidden = fit_table(columns, cells, width)
    lines = _render(table, width)
    assert all(len(line) <= width for line in lines)
    text = "\n".join(lines)
    assert all(format(s, "x") in text for s, _ in rows)


def test_iso_utc() -> None:
    import datetime as dt

    t = dt.datetime(2026, 12, 5, 4, 15, 27, 123, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert iso_utc(t) == "2026-12-05T03:15:27Z"
    assert iso_utc("2026-12-05T03:15:27+00:00") == "2026-12-05T03:15:27Z"
    assert iso_utc(None) is None


def test_output_paths_are_checked_before_the_work(tmp_path: Path) -> None:
    check_out_file(tmp_path / "new.pem")
    check_out_dir(tmp_path / "a" / "b")  # made later, with its parents
    for call, path, words in (
        (check_out_file, tmp_path / "no" / "x.pem", "does not exist"),
        (check_out_file, tmp_path, "is a folder"),
        (check_out_dir, tmp_path / "f", "is a file"),
    ):
        (tmp_path / "f").write_text("x")
        with pytest.raises(BadRequestError) as e:
            call(path)
        assert words in e.value.message
        assert e.value.field == "out"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_folder_not_writable_is_refused(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(BadRequestError, match="may not write"):
        check_out_file(ro / "x.pem")
    with pytest.raises(BadRequestError, match="may not write"):
        check_out_dir(ro / "sub")


def test_a_failed_write_after_the_work_is_reported_not_raised(tmp_path: Path) -> None:
    problem = write_after_work(tmp_path / "gone" / "x.pem", b"x", done="certificate 67fd was issued")
    assert problem is not None
    assert problem.startswith("certificate 67fd was issued, but writing")
    assert write_after_work(tmp_path / "x.pem", b"x", done="d") is None
    assert (tmp_path / "x.pem").read_bytes() == b"x"
