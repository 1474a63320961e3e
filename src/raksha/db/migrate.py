"""Schema migrations run from Python (alembic, scripts in raksha/db/migrations).

``upgrade(url)`` brings any database, empty or older, to the newest schema;
``current(url)`` tells which revision a database is at; ``head()`` the newest.
"""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from raksha.db.engine import make_engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# alembic keeps its running context in module globals: one migration per process at a time.
# Across processes (services starting together) env.py takes a database lock.
_IN_PROCESS = threading.Lock()


def alembic_config(engine: Engine | None = None) -> Config:
    """An alembic config without an ini file; ``engine`` is handed to env.py as is."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def head() -> str:
    rev = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert rev is not None
    return rev


def _engine(url: str | URL | Engine) -> tuple[Engine, bool]:
    if isinstance(url, Engine):
        return url, False
    return make_engine(url), True


def upgrade(url: str | URL | Engine, revision: str = "head") -> str | None:
    """Migrate the database at ``url`` to ``revision`` (the newest by default); returns where it is now."""
    engine, own = _engine(url)
    try:
        with _IN_PROCESS:
            command.upgrade(alembic_config(engine), revision)
        return current(engine)
    finally:
        if own:
            engine.dispose()


def downgrade(url: str | URL | Engine, revision: str) -> str | None:
    engine, own = _engine(url)
    try:
        with _IN_PROCESS:
            command.downgrade(alembic_config(engine), revision)
        return current(engine)
    finally:
        if own:
            engine.dispose()


def current(url: str | URL | Engine) -> str | None:
    """The revision the database is at; None for a database never migrated."""
    engine, own = _engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        if own:
            engine.dispose()
