"""Alembic environment: run by raksha.db.migrate (``upgrade(url)``), never from an ini file.

The engine comes in ``config.attributes["engine"]``; SQLite runs in batch mode so
later migrations can alter columns there too.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from raksha.db.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        raise RuntimeError("run migrations through raksha.db.migrate (upgrade(url)), which hands env.py an engine")
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=sqlite,
            compare_type=True,
            # alembic's SQLite dialect commits after every migration; a service waiting for the lock
            # would take it between two, read the older revision and run the next migration again.
            # SQLite's DDL is transactional: the whole upgrade is one transaction, as on PostgreSQL.
            transactional_ddl=True if sqlite else None,  # None: the dialect's own
        )
        with context.begin_transaction():
            _serialize(connection)
            context.run_migrations()
        connection.commit()
        if connection.dialect.name in ("mysql", "mariadb"):
            connection.exec_driver_sql("SELECT RELEASE_LOCK('raksha_migrations')")


def _serialize(connection: Connection) -> None:
    """One migration at a time per database: services starting together must not both create the tables.

    The second waits, then finds the schema at head and does nothing. On SQLite the upgrade's single
    ``BEGIN IMMEDIATE`` transaction (raksha.db.engine) already serializes.
    """
    name = connection.dialect.name
    if name == "postgresql":
        connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7007200601)")
    elif name in ("mysql", "mariadb"):
        got = connection.exec_driver_sql("SELECT GET_LOCK('raksha_migrations', 300)").scalar()
        if got != 1:
            raise RuntimeError("another migration of this database has held its lock for 5 minutes")


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported; use raksha.db.migrate.upgrade(url)")
run_migrations_online()
