"""Backup jobs and vault services in the database: create, read, list a page at a time, update, soft-delete.

Every test runs on SQLite, and in the slow runs on real PostgreSQL and MariaDB too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, select

from raksha.db import Database
from raksha.db import api as db
from raksha.db.models import BackupJob, BackupJobVm
from raksha.domain.context import RequestContext
from raksha.domain.errors import Conflict, InvalidInput, JobBusy, NotFound

P1, P2, USER = "project-1", "project-2", "user-1"


def test_a_job_is_created_with_its_vms_and_read_back(raksha_db: Database) -> None:
    with raksha_db.begin() as s:
        vault = db.create_vault_service(s, P1, USER, name="local", type="local", url="file:///var/lib/raksha/vault")
        job = db.create_job(s, P1, USER, name="web", description="the web tier", vms=["web-1", ("uuid-2", "web-2")],
                            vault_service_id=vault.id, schedule_interval_seconds=3600, full_every=7,
                            retention={"keep_last": 7}, excluded_disks={"web-1": ["vdb"]})
    with raksha_db.begin() as s:
        again = db.get_job(s, P1, job.id)
    assert again.name == "web" and again.status == "available"
    assert [(vm.vm_id, vm.vm_name) for vm in again.vms] == [("web-1", None), ("uuid-2", "web-2")]
    assert again.vault_service is not None and again.vault_service.url == "file:///var/lib/raksha/vault"
    assert again.retention == {"keep_last": 7} and again.excluded_disks == {"web-1": ["vdb"]}
    assert again.created_at.tzinfo is UTC and again.updated_at >= again.created_at
    assert len(again.id) == 36 and not again.deleted and again.deleted_at is None


def test_another_project_sees_nothing_of_a_job(raksha_db: Database) -> None:
    with raksha_db.begin() as s:
        job = db.create_job(s, P1, USER, name="mine", vms=["vm"])
    with raksha_db.begin() as s:
        with pytest.raises(NotFound) as caught:
            db.get_job(s, P2, job.id)
        assert caught.value.code == "BACKUPJOB_NOT_FOUND"
        assert db.list_jobs(s, P2) == []
        for forbidden in (lambda: db.update_job(s, P2, job.id, name="theirs"), lambda: db.delete_job(s, P2, job.id),
                          lambda: db.create_run(s, P2, USER, job.id, backuptype="full")):
            with pytest.raises(NotFound):
                forbidden()
    with raksha_db.begin() as s:
        assert db.get_job(s, P1, job.id).name == "mine"


def test_lists_come_a_page_at_a_time_newest_first(raksha_db: Database) -> None:
    with raksha_db.begin() as s:
        ids = [db.create_job(s, P1, USER, name=f"job-{i}", vms=["vm"]).id for i in range(5)]
        db.create_job(s, P2, USER, name="other", vms=["vm"])
    with raksha_db.begin() as s:
        first = db.list_jobs(s, P1, limit=2)
        second = db.list_jobs(s, P1, limit=2, marker=first[-1].id)
        third = db.list_jobs(s, P1, limit=2, marker=second[-1].id)
        oldest_first = db.list_jobs(s, P1, sort_dir="asc")
        by_offset = db.list_jobs(s, P1, limit=2, offset=2)
    assert [j.id for j in first + second + third] == ids[::-1]
    assert [j.id for j in oldest_first] == ids
    assert by_offset == second
    assert all(len(j.vms) == 1 for j in first)  # loaded, usable outside the transaction


@contextmanager
def statements(raksha_db: Database) -> Iterator[list[str]]:
    """The SQL statements run inside the block."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    event.listen(raksha_db.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(raksha_db.engine, "before_cursor_execute", record)


def _jobs_with_runs(raksha_db: Database, n: int) -> list[str]:
    ids = []
    with raksha_db.begin() as s:
        vault = db.create_vault_service(s, P1, USER, name="v", type="local", url="file:///v")
        for i in range(n):
            job = db.create_job(s, P1, USER, name=f"job-{i}", vms=[f"vm-{i}", f"vm-{i}-b"],
                                vault_service_id=vault.id if i % 2 else None)
            ids.append(job.id)
            if i % 3:
                db.create_run(s, P1, USER, job.id, backuptype="full")
    return ids


@pytest.mark.parametrize("listing", ["db", "service"])
def test_listing_jobs_costs_the_same_queries_for_2_jobs_as_for_12(raksha_db: Database, listing: str) -> None:
    """A job's VMs, vault service and last run are loaded for the whole page at once, never job by job."""
    from raksha.services.service import Service

    service = Service(raksha_db, None, None)  # type: ignore[arg-type]  # listing needs neither rpc nor agent
    ctx = RequestContext(P1, USER)
    lists: dict[str, Callable[[], list[Any]]] = {
        "db": lambda: _db_list(raksha_db),
        "service": lambda: service.list_jobs(ctx, limit=100, marker=None, filters={}),
    }
    _jobs_with_runs(raksha_db, 2)
    with statements(raksha_db) as few:
        assert len(lists[listing]()) == 2
    _jobs_with_runs(raksha_db, 10)
    with statements(raksha_db) as many:
        jobs = lists[listing]()
    assert len(jobs) == 12
    assert len(many) == len(few) <= 6, many
    if listing == "service":
        assert [j["last_run"] is not None for j in jobs] == [bool(i % 3) for i in reversed(range(10))] + [
            True, False]
        assert all(len(j["vms"]) == 2 for j in jobs)


def _db_list(raksha_db: Database) -> list[Any]:
    with raksha_db.begin() as s:
        jobs = db.list_jobs(s, P1)
        db.last_runs(s, P1, [j.id for j in jobs])
    assert all(len(j.vms) == 2 for j in jobs)  # loaded, usable outside the transaction
    assert sum(j.vault_service is not None for j in jobs) == len(jobs) // 2
    return jobs


def test_last_runs_are_each_jobs_newest_live_run(raksha_db: Database) -> None:
    with raksha_db.begin() as s:
        a = db.create_job(s, P1, USER, name="a", vms=["vm"]).id
        b = db.create_job(s, P1, USER, name="b", vms=["vm"]).id
        none = db.create_job(s, P1, USER, name="none", vms=["vm"]).id
        first = db.create_run(s, P1, USER, a, backuptype="full").id
        db.transition_run(s, P1, first, "cancelled")
        second = db.create_run(s, P1, USER, a, backuptype="full").id  # newest of a, still queued
        gone = db.create_run(s, P1, USER, b, backuptype="full").id
        db.transition_run(s, P1, gone, "cancelled")
        db.transition_run(s, P1, gone, "deleting")
        db.transition_run(s, P1, gone, "deleted")
    with raksha_db.begin() as s:
        last = db.last_runs(s, P1, [a, b, none])
        assert {job: run.id for job, run in last.items()} == {a: second}
        assert last[a].status == "queued"
        assert db.last_runs(s, P2, [a, b]) == {}  # another project's jobs have none
        assert db.last_runs(s, P1, []) == {}
        assert [r.id for r in db.list_runs(s, P1, job_id=a, limit=1)] == [second]  # what the view showed before


def test_a_marker_of_another_list_or_project_is_refused(raksha_db: Database) -> None:
    with raksha_db.begin() as s:
        theirs = db.create_job(s, P2, USER, name="theirs", vms=["vm"])
        db.create_job(s, P1, USER, name="mine", vms=["vm"])
    with raksha_db.begin() as s:
        with pytest.raises(InvalidInput) as caught:
            db.list_jobs(s, P1, marker=theirs.id)
        assert caught.value.code == "MARKER_INVALID"
        with pytest.raises(InvalidInput, match="limit"):
            db.list_jobs(s, P1, limit=0)


def test_lists_filter_by_status_and_name(raksha_db: Database) -> None:
    with raksha_db.begin() as s:
        db.create_job(s, P1, USER, name="a", vms=["vm"])
        b = db.create_job(s, P1, USER, name="b", vms=["vm"])
    with raksha_db.begin() as s:
        assert [j.id for j in db.list_jobs(s, P1, name="b")] == [b.id]
        assert len(db.list_jobs(s, P1, status="available")) == 2
        assert db.list_jobs(s, P1, status="deleted") == []


def test_updating_a_job_replaces_its_vms_and_never_its_identity(raksha_db: Database) -> None:
    with raksha_db.begin() as s:
        job = db.create_job(s, P1, USER, name="old", vms=["a", "b"])
    with raksha_db.begin() as s:
        job = db.update_job(s, P1, job.id, name="new", schedule_cron="0 3 * * *", vms=["b", "c"])
    assert job.name == "new" and job.schedule_cron == "0 3 * * *"
    assert [vm.vm_id for vm in job.vms] == ["b", "c"]
    with raksha_db.begin() as s:
        rows = s.execute(select(BackupJobVm).where(BackupJobVm.backupjob_id == job.id)).scalars().all()
        assert sorted((r.vm_id, r.deleted) for r in rows) == [("a", True), ("b", False), ("b", True), ("c", False)]
        for field in ("status", "project_id", "id", "active_run_id"):
            with pytest.raises(InvalidInput) as caught:
                db.update_job(s, P1, job.id, **{field: "x"})
            assert caught.value.code == "FIELD_NOT_UPDATABLE"


def test_a_job_needs_vms_each_listed_once(raksha_db: Database) -> None:
    with raksha_db.begin() as s:
        for vms in ([], ["a", "a"]):
            with pytest.raises(InvalidInput):
                db.create_job(s, P1, USER, name="x", vms=vms)


def test_a_deleted_job_is_gone_for_its_project_but_kept_as_a_row(raksha_db: Database) -> None:
    with raksha_db.begin() as s:
        job = db.create_job(s, P1, USER, name="x", vms=["vm"])
    with raksha_db.begin() as s:
        db.delete_job(s, P1, job.id)
    with raksha_db.begin() as s:
        with pytest.raises(NotFound):
            db.get_job(s, P1, job.id)
        assert db.list_jobs(s, P1) == []
        row = s.get(BackupJob, job.id)
        assert row is not None and row.deleted and row.status == "deleted" and row.deleted_at is not None


def test_a_job_with_a_run_in_progress_cannot_be_deleted(raksha_db: Database) -> None:
    with raksha_db.begin() as s:
        job = db.create_job(s, P1, USER, name="x", vms=["vm"])
        db.create_run(s, P1, USER, job.id, backuptype="full")
    with raksha_db.begin() as s, pytest.raises(JobBusy):
        db.delete_job(s, P1, job.id)


def test_vault_services_are_a_projects_own_or_shared(raksha_db: Database) -> None:
    with raksha_db.begin() as s:
        shared = db.create_vault_service(s, None, None, name="default", type="local", url="file:///srv/vault")
        own = db.create_vault_service(s, P1, USER, name="s3", type="s3", url="https://s3.example/b",
                                      config={"bucket": "b"})
    with raksha_db.begin() as s:
        assert {v.id for v in db.list_vault_services(s, P1)} == {shared.id, own.id}
        assert {v.id for v in db.list_vault_services(s, P2)} == {shared.id}
        assert db.get_vault_service(s, P2, shared.id).name == "default"
        with pytest.raises(NotFound) as caught:
            db.get_vault_service(s, P2, own.id)
        assert caught.value.code == "VAULT_SERVICE_NOT_FOUND"
        with pytest.raises(NotFound):
            db.update_vault_service(s, P2, shared.id, name="mine now")  # shared ones are the operators'
        assert db.update_vault_service(s, P1, own.id, description="backups").description == "backups"
        with pytest.raises(InvalidInput):
            db.create_vault_service(s, P1, USER, name="x", type="ftp", url="ftp://x")
        with pytest.raises(NotFound):
            db.create_job(s, P2, USER, name="x", vms=["vm"], vault_service_id=own.id)


def test_a_vault_service_in_use_is_not_deleted(raksha_db: Database) -> None:
    with raksha_db.begin() as s:
        vault = db.create_vault_service(s, P1, USER, name="v", type="local", url="file:///v")
        job = db.create_job(s, P1, USER, name="x", vms=["vm"], vault_service_id=vault.id)
    with raksha_db.begin() as s, pytest.raises(Conflict) as caught:
        db.delete_vault_service(s, P1, vault.id)
    assert caught.value.code == "VAULT_SERVICE_IN_USE"
    with raksha_db.begin() as s:
        db.delete_job(s, P1, job.id)
        db.delete_vault_service(s, P1, vault.id)
        assert db.list_vault_services(s, P1) == []


def test_the_scheduler_finds_due_jobs_of_every_project(raksha_db: Database) -> None:
    now = datetime.now(UTC)
    with raksha_db.begin() as s:
        due = db.create_job(s, P1, USER, name="due", vms=["vm"], next_run_at=now - timedelta(minutes=1))
        due2 = db.create_job(s, P2, USER, name="due2", vms=["vm"], next_run_at=now - timedelta(minutes=2))
        db.create_job(s, P1, USER, name="later", vms=["vm"], next_run_at=now + timedelta(hours=1))
        db.create_job(s, P1, USER, name="paused", vms=["vm"], next_run_at=now, schedule_enabled=False)
        db.create_job(s, P1, USER, name="unscheduled", vms=["vm"])
        running = db.create_job(s, P1, USER, name="running", vms=["vm"], next_run_at=now)
        db.create_run(s, P1, USER, running.id, backuptype="full")
    with raksha_db.begin() as s:
        assert [j.id for j in db.due_jobs(s, now)] == [due2.id, due.id]


def test_readers_do_not_wait_for_a_writer(raksha_db: Database) -> None:
    with raksha_db.begin() as s:
        job = db.create_job(s, P1, USER, name="x", vms=["vm"])
    with raksha_db.begin() as writer:
        db.update_job(writer, P1, job.id, name="being renamed")
        with raksha_db.read() as reader:  # while the write transaction is open
            assert db.get_job(reader, P1, job.id).name == "x"
    with raksha_db.read() as reader:
        assert db.get_job(reader, P1, job.id).name == "being renamed"
