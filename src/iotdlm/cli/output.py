"""What the operator's commands print: serials (read in any common spelling, printed whole),
tables that fit the terminal by leaving out the least useful columns (never by cutting a serial
or an id), JSON for scripts (``--json``), and output paths checked before any work is done."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from iotdlm.errors import BadRequestError

F = TypeVar("F", bound=Callable[..., Any])

#: RFC 5280 4.1.2.2: a serial is a positive integer of at most 20 octets
MAX_SERIAL = 1 << 160
_HEX = re.compile(r"[0-9a-fA-F]+")
_COLON_HEX = re.compile(r"[0-9a-fA-F]{1,2}(:[0-9a-fA-F]{1,2})+")


def parse_serial(text: str) -> int:
    """A certificate serial as the operator copied it: hex in any case, with or without ``0x``,
    with or without colons between the bytes (``openssl x509 -text``), or ``serial=...``
    (``openssl x509 -serial``). Anything else is a BadRequestError that says what to give."""
    raw = text.strip() if isinstance(text, str) else ""
    body = raw
    if body[:7].lower() == "serial=":
        body = body[7:]
    if body[:2].lower() == "0x":
        body = body[2:]
    if _COLON_HEX.fullmatch(body):
        body = body.replace(":", "")
    if not _HEX.fullmatch(body):
        shown = raw if len(raw) <= 80 else raw[:77] + "..."
        raise BadRequestError(
            f"{shown!r} is not a certificate serial (not hexadecimal): give it as `iotdlm ca list` prints "
            "it (colons between bytes, a 0x prefix and upper case are fine, e.g. 67:FD:15:F3 as "
            "`openssl x509 -text` prints it)",
            field="serial",
        )
    value = int(body, 16)
    if value == 0 or value >= MAX_SERIAL:
        raise BadRequestError(
            f"serial {body[:48]}{'...' if len(body) > 48 else ''} is out of range: a certificate serial "
            "is a positive number of at most 20 bytes (40 hex digits)",
            field="serial",
        )
    return value


def serial_hex(value: int) -> str:
    """The serial as every table and JSON answer prints it: lower-case hex, whole."""
    return format(value, "x")


def iso_utc(value: dt.datetime | str | None) -> str | None:
    """ISO 8601 in UTC with a ``Z`` (``2026-12-05T03:15:27Z``); None stays None. A string already
    in ISO 8601 is normalized the same way (naive times are taken as UTC)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return iso_utc(dt.datetime.fromisoformat(value))
        except ValueError:
            return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def json_option(f: F) -> F:
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print JSON for scripts instead of a table (keys: docs/operations.md, 'JSON output').",
    )(f)


def print_json(obj: object) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


# --- tables that fit ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """A table column. ``whole``: its values are never cut or wrapped (serials, ids); ``drop``: 0
    is always shown, otherwise the column with the highest ``drop`` is left out first when the
    terminal is too narrow; ``min`` is the narrowest it may be wrapped to."""

    header: str
    whole: bool = False
    drop: int = 0
    min: int = 10


def _table_width(widths: Sequence[int]) -> int:
    """The width of a :func:`fit_table` table: the columns and 3 characters between two columns."""
    return sum(widths) + 3 * max(len(widths) - 1, 0)


def _cell_len(cell: str) -> int:
    lines = Text.from_markup(cell).plain.splitlines() or [""]
    return max(len(line) for line in lines)


def fit_table(
    columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int, *, title: str | None = None
) -> tuple[Table, list[str]]:
    """A table of ``rows`` no wider than ``width`` when possible: columns left out by ``drop``
    (highest first) until the whole values and the narrowest wrapped values fit. Returns the table
    and the headers left out."""
    natural = [max([len(c.header), *(_cell_len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    keep = list(range(len(columns)))

    def least(i: int) -> int:
        return natural[i] if columns[i].whole else min(natural[i], max(columns[i].min, len(columns[i].header)))

    for i in sorted((i for i, c in enumerate(columns) if c.drop), key=lambda i: -columns[i].drop):
        if _table_width([least(k) for k in keep]) <= width:
            break
        keep.remove(i)
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for i in keep:
        c = columns[i]
        if c.whole:
            table.add_column(c.header, no_wrap=True, min_width=natural[i])
        else:
            table.add_column(c.header, overflow="fold")
    for r in rows:
        table.add_row(*(r[i] for i in keep))
    return table, [columns[i].header for i in range(len(columns)) if i not in keep]


def print_table(
    console: Console,
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    *,
    title: str | None = None,
    has_json: bool = True,
) -> None:
    """Print a :func:`fit_table` at the console's width, and name the columns left out (and
    where to see them: ``--json`` if the command has it, else a wider terminal)."""
    table, hidden = fit_table(columns, rows, console.width, title=title)
    console.print(table)
    if hidden:
        where = "--json shows all" if has_json else "a wider terminal shows them"
        console.print(f"(hidden at this width: {', '.join(hidden)}; {where})")


# --- output paths ---------------------------------------------------------------------------------
def check_out_file(path: Path, *, option: str = "--out") -> None:
    """Refuse, before any work is done, an output file that cannot be written: a folder, a missing
    parent folder, or one this user may not write in."""
    if path.is_dir():
        raise BadRequestError(f"{option} {path} is a folder; give a file name in it", field=option.lstrip("-"))
    _check_parent(path.parent if str(path.parent) else Path("."), option)
    if path.exists() and not os.access(path, os.W_OK):
        raise BadRequestError(f"{option} {path} exists and is not writable by you", field=option.lstrip("-"))


def check_out_dir(path: Path, *, option: str = "--out") -> None:
    """Refuse, before any work is done, an output folder that cannot be made or written in."""
    if path.exists() and not path.is_dir():
        raise BadRequestError(f"{option} {path} is a file; give a folder", field=option.lstrip("-"))
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise BadRequestError(f"{option} {path}: you may not write in this folder", field=option.lstrip("-"))
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    _check_parent(parent, option, made=path)


def _check_parent(parent: Path, option: str, *, made: Path | None = None) -> None:
    field = option.lstrip("-")
    if not parent.exists():
        raise BadRequestError(
            f"{option}: folder {parent} does not exist; create it (mkdir -p {parent}) or choose another path",
            field=field,
        )
    if not parent.is_dir():
        raise BadRequestError(f"{option}: {parent} is not a folder", field=field)
    if not os.access(parent, os.W_OK | os.X_OK):
        what = f"to create {made}" if made is not None else "to write there"
        raise BadRequestError(f"{option}: you may not write in folder {parent} ({what})", field=field)


def write_after_work(path: Path, data: bytes, *, done: str) -> str | None:
    """Write an output after the work is done; on failure return a message that names what was
    done (``done``: "certificate 67fd... issued") and where it is kept, instead of raising."""
    try:
        path.write_bytes(data)
    except OSError as exc:
        return f"{done}, but writing {path} failed ({exc.strerror or exc})"
    return None
