"""Alembic environment for the iotdlm store.

``Store.migrate()`` hands over an open connection, already inside a locked transaction, through
``config.attributes["connection"]``. Run from the command line (developers writing migrations),
the URL comes from ``sqlalchemy.url`` or the ``IOTDLM_STORE_URL`` environment variable.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from iotdlm.store.tables import metadata

config = context.config


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        transactional_ddl=True,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("IOTDLM_STORE_URL")
    if not url:
        raise RuntimeError("set sqlalchemy.url in the Alembic config or IOTDLM_STORE_URL in the environment")
    return url


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=metadata, literal_binds=True, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    given = config.attributes.get("connection")
    if isinstance(given, Connection):
        _configure(given)
        with context.begin_transaction():
            context.run_migrations()
        return
    from iotdlm.store.store import Store

    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    store = Store.open(_url(), migrate=False)
    try:
        with store.migration_connection() as connection:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        store.close()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
