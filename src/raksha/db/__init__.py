"""Raksha's database: typed SQLAlchemy 2 models, alembic migrations, tenant-scoped queries.

``Database(url)`` opens one (SQLite by default, PostgreSQL, MySQL/MariaDB);
``raksha.db.migrate.upgrade(url)`` brings its schema to the newest; ``raksha.db.api``
holds the queries. The schema is described in docs/design/database.md.
"""

from raksha.db.engine import Database, make_engine

__all__ = ["Database", "make_engine"]
