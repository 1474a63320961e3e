"""Alembic environment: run by raksha.db.migrate (``upgrade(url)``), never from an ini file.

The engine comes in ``config.attributes["engine"]``; SQLite runs in batch mode so
later migrations can alter columns there too.
"""

from __future__ import annotations

from alembic import context

from raksha.db.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        raise RuntimeError("run migrations through raksha.db.migrate (upgrade(url)), which hands env.py an engine")
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported; use raksha.db.migrate.upgrade(url)")
run_migrations_online()
