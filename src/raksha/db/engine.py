"""Engines and sessions from a database URL: SQLite (the embedded default), PostgreSQL, MySQL/MariaDB.

SQLite gets WAL, foreign keys, a busy timeout and ``BEGIN IMMEDIATE`` transactions
(a transaction takes the write lock when it starts, so two writers queue instead of
failing on a lock upgrade); ``Database.read()`` sessions use a deferred ``BEGIN`` and
never wait for a writer. Server databases get a pool that pings connections
before use and recycles them before a server's idle timeout (MySQL's 8 hours).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from raksha.domain.errors import InvalidInput

SQLITE_BUSY_TIMEOUT_S = 30
READ_ONLY = "raksha_read_only"


def _is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or "mode=memory" in str(url)


def _create_private(path: str) -> None:
    """A new database file is its owner's alone (it holds the vault services' settings, credentials
    among them); SQLite gives its ``-wal`` and ``-shm`` the same mode. An existing one is left as it is,
    and a missing folder is SQLite's to report."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        pass


def make_engine(url: str | URL, *, echo: bool = False) -> Engine:
    """An engine for ``url`` with pool and connection settings fitting its backend."""
    url = make_url(url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        memory = _is_memory(url)
        if not memory and url.database:
            _create_private(url.database)
        kwargs: dict[str, Any] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}}
        if memory:
            kwargs["poolclass"] = StaticPool  # one connection, or each would see its own empty database
        engine = create_engine(url, echo=echo, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # let SQLAlchemy's "begin" event emit BEGIN itself
            cur = dbapi_conn.cursor()
            try:
                if not memory:
                    cur.execute("PRAGMA journal_mode=WAL")
                    cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
            finally:
                cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # Database.read(): a deferred BEGIN, so WAL readers never wait for a writer.
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True, pool_recycle=3600, pool_size=5, max_overflow=10)


def _refused(exc: DataError) -> InvalidInput:
    reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
    return InvalidInput(f"the database refused a value: {reason}", code="VALUE_INVALID")


class Database:
    """An engine and its session factory. ``with db.begin() as session:`` is one transaction.

    Objects loaded in a transaction stay usable after it (``expire_on_commit=False``); the
    data-access functions (raksha.db.api) load every relationship their callers read.
    """

    def __init__(self, url: str | URL, *, echo: bool = False) -> None:
        self.url = make_url(url)
        self.engine = make_engine(self.url, echo=echo)
        self.sessions: sessionmaker[Session] = sessionmaker(self.engine, expire_on_commit=False)
        self._readers: sessionmaker[Session] = sessionmaker(self.engine.execution_options(**{READ_ONLY: True}),
                                                            expire_on_commit=False)

    @contextmanager
    def begin(self) -> Iterator[Session]:
        """A session in a transaction: committed when the block ends, rolled back if it raises.

        A value the database refuses (too long for its column, a NUL character on PostgreSQL, out of
        range) is ``VALUE_INVALID``, never a driver's error."""
        try:
            with self.sessions.begin() as session:
                yield session
        except DataError as exc:
            raise _refused(exc) from exc

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading only (API GETs): on SQLite it does not queue behind writers."""
        try:
            with self._readers.begin() as session:
                yield session
        except DataError as exc:
            raise _refused(exc) from exc

    def dispose(self) -> None:
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Database({self.url.render_as_string(hide_password=True)!r})"
