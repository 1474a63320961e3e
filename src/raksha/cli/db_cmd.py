"""``raksha db ...``: create or migrate the service's database (``upgrade``), tell its schema revision
(``version``), remove rows soft-deleted long ago (``purge``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from raksha.cli.output import emit, table
from raksha.domain.errors import BackendError, InvalidInput

# SQLAlchemy and alembic load only when a db command runs: every other command starts faster.

ENV_URL = "RAKSHA_DATABASE_URL"


def default_url() -> str:
    """``$RAKSHA_DATABASE_URL``, else SQLite in the embedded data directory (``$RAKSHA_DATA_DIR``, /var/lib/raksha)."""
    if os.environ.get(ENV_URL):
        return os.environ[ENV_URL]
    data_dir = Path(os.environ.get("RAKSHA_DATA_DIR") or "/var/lib/raksha")
    return f"sqlite:///{data_dir / 'raksha.sqlite'}"


def _url(args: argparse.Namespace) -> str:
    from sqlalchemy.engine import make_url

    url: str = args.url or default_url()
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        os.makedirs(Path(parsed.database or "").parent, mode=0o711, exist_ok=True)  # as `serve` makes it
    return url


def _shown(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _database_errors(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            return int(func(args))
        except SQLAlchemyError as err:
            raise BackendError(f"database {_shown(_url(args))}: {str(err).splitlines()[0]}",
                               code="DATABASE_UNAVAILABLE") from err
    return run


@_database_errors
def cmd_upgrade(args: argparse.Namespace) -> int:
    from raksha.db import migrate

    url = _url(args)
    before = migrate.current(url)
    after = migrate.upgrade(url, args.revision)
    result: dict[str, Any] = {"url": _shown(url), "from": before, "to": after, "head": migrate.head()}
    emit(result, args.json, f"database {_shown(url)}: schema {before or 'empty'} -> {after}")
    return 0


@_database_errors
def cmd_version(args: argparse.Namespace) -> int:
    from raksha.db import migrate

    url = _url(args)
    rev, head = migrate.current(url), migrate.head()
    emit({"url": _shown(url), "current": rev, "head": head, "up_to_date": rev == head}, args.json,
         f"database {_shown(url)}: schema {rev or 'empty'} (newest {head})")
    return 0


@_database_errors
def cmd_purge(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from raksha.db import Database
    from raksha.db.api import purge
    from raksha.db.types import utcnow

    if args.before < 0:
        raise InvalidInput(f"--before takes a number of days >= 0, not {args.before}", code="USAGE")
    if args.batch_size < 1:
        raise InvalidInput(f"--batch-size takes a number >= 1, not {args.batch_size}", code="USAGE")
    url = _url(args)
    before = utcnow() - timedelta(days=args.before)
    database = Database(url)
    try:
        counts = purge.purge_deleted(database, before, batch_size=args.batch_size, dry_run=args.dry_run)
    finally:
        database.dispose()
    total = sum(counts.values())
    result = {"url": _shown(url), "before": before.isoformat(), "dry_run": args.dry_run, "rows": counts,
              "total": total}
    verb = "would purge" if args.dry_run else "purged"
    text = (f"database {_shown(url)}: {verb} {total} rows soft-deleted before {before:%Y-%m-%d %H:%M:%S} UTC\n"
            + table([[name, str(n)] for name, n in counts.items()], ["table", "rows"]))
    emit(result, args.json, text)
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    db = sub.add_parser("db", help="the service's database: create or migrate it (upgrade), show its revision, "
                                   "purge soft-deleted rows")
    dsub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    for name, func, text in (("upgrade", cmd_upgrade, "create the schema or migrate it to the newest revision"),
                             ("sync", cmd_upgrade, "the same as upgrade (OpenStack's `db sync`)"),
                             ("version", cmd_version, "show the schema revision of the database"),
                             ("purge", cmd_purge, "remove rows soft-deleted more than --before DAYS ago "
                                                  "(children first, in batches; never a run a live backup "
                                                  "chain still needs)")):
        p = dsub.add_parser(name, help=text)
        p.add_argument("--url", help=f"SQLAlchemy URL (default ${ENV_URL}, else SQLite under $RAKSHA_DATA_DIR "
                                     "or /var/lib/raksha)")
        if func is cmd_upgrade:
            p.add_argument("--revision", default="head", help=argparse.SUPPRESS)
        if func is cmd_purge:
            p.add_argument("--before", type=int, required=True, metavar="DAYS",
                           help="purge rows soft-deleted more than DAYS days ago (0: all of them)")
            p.add_argument("--dry-run", action="store_true", help="count what would be purged, remove nothing")
            p.add_argument("--batch-size", type=int, default=500, metavar="N",
                           help="top rows (runs with their VMs, disks and backups; jobs; ...) per transaction")
        p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
        p.set_defaults(func=func)
