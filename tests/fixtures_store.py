"""Store fixtures: SQLite in a temp folder, and PostgreSQL on 127.0.0.1:5432 when it answers.

- ``store_url``: a database URL, parametrised over ``sqlite`` and ``postgres`` (the latter marked
  ``postgres``). Every test gets an empty database: a fresh file under ``tmp_path``, or a fresh
  schema ``t_<random>`` in database ``test`` (selected through libpq ``options=-csearch_path=...``
  in the URL, so ``Store.open(store_url)`` needs nothing more), dropped afterwards.
- ``sqlite_url`` / ``postgres_url``: one backend only.
- ``store``: ``Store.open(store_url)`` (migrated), closed afterwards.
- ``make_cert(...)``: a valid :class:`CertRecord` with a fake DER, for tests.
- ``count_statements(store, "SELECT")``: counts the SQL statements a store sends, for tests of
  streaming (several small queries rather than one big one).

When PostgreSQL does not answer within 2 s, every test needing it is skipped with the reason
(shown by ``-ra``), once per session.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import event

from iotdlm.store import CertRecord, Store
from iotdlm.store.records import fingerprint_of

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_DATABASE = "test"
PG_USERS = ("postgres", "root")
PG_CONNECT_TIMEOUT_S = 2

T0 = dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.UTC)


def _pg_connect(user: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        host=PG_HOST,
        port=PG_PORT,
        dbname=PG_DATABASE,
        user=user,
        connect_timeout=PG_CONNECT_TIMEOUT_S,
        autocommit=True,
    )


@pytest.fixture(scope="session")
def postgres_user() -> str:
    """A PostgreSQL role that can log in to ``test`` without a password (skips if none)."""
    failures: list[str] = []
    for user in PG_USERS:
        try:
            with _pg_connect(user) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            failures.append(f"as {user}: {first_line}")
            if "role" in first_line or "authentication" in first_line:
                continue  # the server answered but refused this user: try the next one
            break
        return user
    pytest.skip(f"PostgreSQL not reachable on {PG_HOST}:{PG_PORT}: " + "; ".join(failures))


def postgres_url_for(user: str, schema: str) -> str:
    options = quote(f"-csearch_path={schema}", safe="")
    # application_name lets a test find its own server processes in pg_stat_activity
    return f"postgresql+psycopg://{user}@{PG_HOST}:{PG_PORT}/{PG_DATABASE}?options={options}&application_name={schema}"


@pytest.fixture
def postgres_schema(postgres_user: str) -> Iterator[str]:
    """A fresh, empty schema in database ``test``, dropped (with its contents) afterwards."""
    schema = f"t_{secrets.token_hex(6)}"
    with _pg_connect(postgres_user) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield schema
    finally:
        with _pg_connect(postgres_user) as conn:
            conn.execute("SET lock_timeout = '10s'")
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def postgres_url(postgres_user: str, postgres_schema: str) -> str:
    return postgres_url_for(postgres_user, postgres_schema)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/store.db"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest) -> str:
    """An empty database on each backend (see the module docstring)."""
    url = request.getfixturevalue(f"{request.param}_url")
    assert isinstance(url, str)
    return url


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """A migrated :class:`Store` over ``store_url``, closed afterwards."""
    opened = Store.open(store_url)
    try:
        yield opened
    finally:
        opened.close()


def make_cert(
    serial: int,
    *,
    issuer: str = "CN=Test Issuing CA",
    device_id: str | None = "dev-1",
    profile: str = "operational",
    status: str = "valid",
    created_at: dt.datetime = T0,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    der: bytes | None = None,
    requested_by: str = "pm",
    crl_partition: int | None = None,
) -> CertRecord:
    """A valid record; the fake DER (hence the fingerprint) is unique per (issuer, serial)."""
    if der is None:
        der = b"\x30\x82fake-cert|" + issuer.encode() + b"|" + serial.to_bytes(21, "big")
    start = not_before or created_at
    return CertRecord(
        serial=serial,
        issuer=issuer,
        subject=f"CN={device_id or 'ca'}",
        device_id=device_id,
        profile=profile,
        not_before=start,
        not_after=not_after or start + dt.timedelta(days=365),
        status=status,
        der=der,
        fingerprint=fingerprint_of(der),
        requested_by=requested_by,
        created_at=created_at,
        crl_partition=crl_partition,
    )


@contextmanager
def count_statements(store: Store, prefix: str) -> Iterator[list[str]]:
    """Collect the SQL statements starting with ``prefix`` (e.g. ``"SELECT"``) that ``store`` sends
    while the block runs; the list fills as they go."""
    seen: list[str] = []

    def before(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.lstrip().upper().startswith(prefix.upper()):
            seen.append(statement)

    engine = store._engine
    event.listen(engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", before)
