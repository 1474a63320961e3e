"""Migrations: from an empty database to the newest schema, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import json
import stat
import subprocess
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event, inspect

from conftest import RAKSHA, cli_env, run_raksha
from raksha.db import make_engine, migrate
from raksha.db.models import Base

SEED_BACKUP_COLUMNS = {"id", "backupjobrun_vm_resource_id", "vm_resource_backup_backing_id", "top",
                       "vault_service_id", "vault_service_url", "vault_service_metadata", "status"}
TABLES = {"vault_services", "backupjobs", "backupjob_vms", "backupjobruns", "backupjobrun_vms",
          "backupjobrun_vm_resources", "vm_resource_backups", "restores", "alembic_version"}


def test_an_empty_database_migrates_to_the_newest_schema(empty_db_url: str) -> None:
    assert migrate.current(empty_db_url) is None
    assert migrate.upgrade(empty_db_url) == migrate.head()
    engine = make_engine(empty_db_url)
    try:
        insp = inspect(engine)
        assert set(insp.get_table_names()) == TABLES
        backup_columns = {c["name"] for c in insp.get_columns("vm_resource_backups")}
        assert backup_columns >= SEED_BACKUP_COLUMNS
        for table in TABLES - {"alembic_version"}:
            columns = {c["name"] for c in insp.get_columns(table)}
            assert {"id", "created_at", "updated_at", "deleted_at", "deleted", "project_id"} <= columns, table
    finally:
        engine.dispose()


def test_upgrading_twice_changes_nothing(empty_db_url: str) -> None:
    assert migrate.upgrade(empty_db_url) == migrate.upgrade(empty_db_url) == migrate.head()


def test_services_starting_together_migrate_once(empty_db_url: str) -> None:
    """Five processes upgrading one empty database at once: one creates the schema, the others wait and find it."""
    # Processes, as services are: alembic's context is process-global, so threads would share it.
    procs = [subprocess.Popen([str(RAKSHA), "db", "upgrade", "--url", empty_db_url, "--json"], env=cli_env(),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(5)]
    outcomes = [(*p.communicate(timeout=300), p.returncode) for p in procs]
    assert [rc for _out, _err, rc in outcomes] == [0] * 5, outcomes
    assert [json.loads(out)["to"] for out, _err, _rc in outcomes] == [migrate.head()] * 5
    assert migrate.current(empty_db_url) == migrate.head()


def test_an_upgrade_is_one_transaction(empty_db_url: str) -> None:
    """Every migration to head commits together: a service waiting for the lock never sees a schema half way.

    (On SQLite alembic would commit after each migration; a waiting service then ran the next one twice.)
    """
    engine = make_engine(empty_db_url)
    if engine.dialect.name in ("mysql", "mariadb"):
        engine.dispose()
        pytest.skip("MySQL commits every DDL statement by itself; GET_LOCK serializes there")
    commits: list[int] = []
    event.listen(engine, "commit", lambda _conn: commits.append(1))
    try:
        assert migrate.upgrade(engine) == migrate.head()
    finally:
        engine.dispose()
    assert len(commits) == 1


def test_the_models_and_the_migrations_describe_the_same_schema(empty_db_url: str) -> None:
    """What autogenerate would write after the last migration: nothing."""
    migrate.upgrade(empty_db_url)
    engine = make_engine(empty_db_url)
    try:
        with engine.connect() as conn:
            diff: list[Any] = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                               Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_the_schema_downgrades_to_empty_and_back(empty_db_url: str) -> None:
    migrate.upgrade(empty_db_url)
    assert migrate.downgrade(empty_db_url, "base") is None
    engine = make_engine(empty_db_url)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    assert migrate.upgrade(empty_db_url) == migrate.head()


def test_raksha_db_upgrade_from_the_command_line(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'data' / 'raksha.sqlite'}"
    rc, out, err = run_raksha("db", "upgrade", "--url", url)
    assert rc == 0, err
    assert f"schema empty -> {migrate.head()}" in out
    rc, out, err = run_raksha("db", "version", "--url", url, "--json")
    assert rc == 0, err
    assert '"up_to_date": true' in out


def test_an_unreachable_database_is_a_coded_error_not_a_traceback(tmp_path: Any) -> None:
    rc, _out, err = run_raksha("db", "version", "--url", f"postgresql+psycopg://nobody@/x?host={tmp_path}")
    assert rc == 8
    assert "[DATABASE_UNAVAILABLE]" in err and "Traceback" not in err


def test_without_a_url_the_database_is_sqlite_in_the_data_directory(tmp_path: Any) -> None:
    rc, out, err = run_raksha("db", "sync", "--json", env={"RAKSHA_DATA_DIR": str(tmp_path / "data")})
    assert rc == 0, err
    assert json.loads(out)["url"] == f"sqlite:///{tmp_path / 'data' / 'raksha.sqlite'}"
    assert (tmp_path / "data" / "raksha.sqlite").is_file()
    # Made as `serve` makes them: a folder others may only pass through, a database its owner's alone
    # (it holds the vault services' settings).
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o711
    assert stat.S_IMODE((tmp_path / "data" / "raksha.sqlite").stat().st_mode) == 0o600
