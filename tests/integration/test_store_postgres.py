"""PostgreSQL-only store behaviour (skipped, with the reason, when PostgreSQL does not answer)."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import cast

import psycopg
import pytest
from psycopg import sql

from iotdlm import errors
from iotdlm.deployment import Deployment
from iotdlm.runtime import km_on_loop
from iotdlm.store import Store
from iotdlm.store.tables import metadata
from tests.fixtures_store import PG_DATABASE, PG_HOST, PG_PORT, T0, make_cert, postgres_url_for

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[Store]:
    with Store.open(postgres_url) as store:
        yield store


def _admin(user: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(host=PG_HOST, port=PG_PORT, dbname=PG_DATABASE, user=user, autocommit=True)


def test_tables_live_in_the_schema_named_in_the_url(pg_store: Store, postgres_user: str, postgres_schema: str) -> None:
    pg_store.add_certificates([make_cert(1)])
    with _admin(postgres_user) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s ORDER BY 1", (postgres_schema,)
        ).fetchall()
        # every table of the schema (tables.py), and Alembic's own, in this schema and nowhere else
        assert [r[0] for r in rows] == sorted(["alembic_version", *metadata.tables])
        count = conn.execute(
            sql.SQL("SELECT count(*) FROM {}.certificates").format(sql.Identifier(postgres_schema))
        ).fetchone()
        assert count == (1,)


def test_two_schemas_are_two_databases(pg_store: Store, postgres_user: str, postgres_schema: str) -> None:
    other_schema = f"{postgres_schema}_other"
    with _admin(postgres_user) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(other_schema)))
    try:
        with Store.open(postgres_url_for(postgres_user, other_schema)) as other:
            other.add_certificates([make_cert(1)])
            assert pg_store.get_certificate("CN=Test Issuing CA", 1) is None
            pg_store.add_certificates([make_cert(1)])  # no collision across schemas
            assert other.count_certificates() == pg_store.count_certificates() == 1
    finally:
        with _admin(postgres_user) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(other_schema)))


def test_url_property_masks_the_password(postgres_user: str, postgres_schema: str) -> None:
    # trust authentication ignores the password, so the connection works and we can look at url
    url = postgres_url_for(postgres_user, postgres_schema).replace(f"{postgres_user}@", f"{postgres_user}:hunter2@")
    with Store.open(url) as store:
        assert "hunter2" not in store.url
        assert f"{postgres_user}:***@{PG_HOST}:{PG_PORT}/{PG_DATABASE}" in store.url
        assert store.backend == "postgresql"


def test_store_survives_its_connections_being_killed(pg_store: Store, postgres_user: str, postgres_schema: str) -> None:
    pg_store.add_certificates([make_cert(1)])
    with _admin(postgres_user) as conn:
        killed = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
            (postgres_schema,),
        ).fetchone()
    assert killed is not None
    assert int(str(killed[0])) >= 1  # at least the pooled connection of pg_store
    # pool_pre_ping notices the dead connection and opens a new one
    assert pg_store.count_certificates() == 1
    pg_store.consume_nonce("s", "n", expires_at=T0)


def test_a_database_error_is_unavailable_not_a_sqlalchemy_type(
    pg_store: Store, postgres_user: str, postgres_schema: str
) -> None:
    with _admin(postgres_user) as conn:
        conn.execute(sql.SQL("DROP TABLE {}.nonces").format(sql.Identifier(postgres_schema)))
    with pytest.raises(errors.UnavailableError, match="failed while recording a nonce") as info:
        pg_store.consume_nonce("s", "n", expires_at=T0)
    assert "nonces" in info.value.message
    assert isinstance(info.value.__cause__, Exception)
    assert type(info.value.__cause__).__module__.startswith("sqlalchemy")  # kept as the cause, for logs


def test_km_keeps_its_threads_on_postgresql(pg_store: Store) -> None:
    """ADR 0032: every query is a round trip to the server, so km serve does not answer on its loop."""
    files_only = cast(Deployment, SimpleNamespace(config=SimpleNamespace(hsm=None)))  # CA keys in files
    assert pg_store.backend == "postgresql"
    assert not km_on_loop(files_only, pg_store)
