"""Restores in the database, and what a restarted service finds unfinished. On every backend in turn."""

from __future__ import annotations

import pytest

from raksha.db import Database
from raksha.db import api as db
from raksha.domain.errors import Conflict, InvalidInput, InvalidStateTransition, NotFound

P1, P2, USER = "project-1", "project-2", "user-1"


def finished_run(raksha_db: Database, end: str = "available") -> tuple[str, str]:
    """A job and a run of it that ended ``end`` (available, error)."""
    with raksha_db.begin() as s:
        job = db.create_job(s, P1, USER, name="app", vms=["vm-a"])
        run = db.create_run(s, P1, USER, job.id, backuptype="full")
        db.transition_run(s, P1, run.id, "snapshotting")
        if end != "error":
            db.transition_run(s, P1, run.id, "uploading")
        db.transition_run(s, P1, run.id, end)
    return job.id, run.id


def test_a_restore_of_an_available_run_is_queued_then_records_what_it_produced(raksha_db: Database) -> None:
    job_id, run_id = finished_run(raksha_db)
    with raksha_db.begin() as s:
        restore = db.create_restore(s, P1, USER, run_id, job_id=job_id, restore_type="new_vm",
                                    selection={"vms": ["vm-a"]}, target={"name_suffix": "-restored"})
    assert (restore.status, restore.restore_type, restore.backupjobrun_id) == ("queued", "new_vm", run_id)
    with raksha_db.begin() as s:
        db.transition_restore(s, P1, restore.id, "restoring")
        db.update_restore(s, P1, restore.id, progress_percent=50, bytes_done=512, bytes_total=1024, eta_seconds=3)
        done = db.transition_restore(
            s, P1, restore.id, "available", progress_percent=100, bytes_done=1024,
            results={"domains": ["vm-a-restored"], "verified": True})
    assert done.status == "available" and done.results == {"domains": ["vm-a-restored"], "verified": True}
    assert done.started_at is not None and done.finished_at is not None
    with raksha_db.begin() as s, pytest.raises(InvalidStateTransition):
        db.transition_restore(s, P1, restore.id, "restoring")


def test_a_failed_run_cannot_be_restored(raksha_db: Database) -> None:
    _job_id, run_id = finished_run(raksha_db, "error")
    with raksha_db.begin() as s, pytest.raises(Conflict) as caught:
        db.create_restore(s, P1, USER, run_id)
    assert caught.value.code == "RUN_NOT_RESTORABLE"


def test_restores_are_a_projects_own(raksha_db: Database) -> None:
    _job_id, run_id = finished_run(raksha_db)
    with raksha_db.begin() as s:
        restore = db.create_restore(s, P1, USER, run_id, restore_type="files", target={"dir": "/srv/out"})
        with pytest.raises(NotFound):
            db.create_restore(s, P2, USER, run_id)
        with pytest.raises(NotFound) as caught:
            db.get_restore(s, P2, restore.id)
        assert caught.value.code == "RESTORE_NOT_FOUND"
        assert db.list_restores(s, P2) == []
        with pytest.raises(InvalidInput):
            db.create_restore(s, P1, USER, run_id, restore_type="tape")
        with pytest.raises(NotFound):
            db.create_restore(s, P1, USER, run_id, job_id="another-job")


def test_restores_are_listed_by_run_status_and_type(raksha_db: Database) -> None:
    _job, run_a = finished_run(raksha_db)
    _job, run_b = finished_run(raksha_db)
    with raksha_db.begin() as s:
        first = db.create_restore(s, P1, USER, run_a)
        second = db.create_restore(s, P1, USER, run_b, restore_type="in_place")
        db.transition_restore(s, P1, first.id, "cancelled")
    with raksha_db.begin() as s:
        assert [r.id for r in db.list_restores(s, P1)] == [second.id, first.id]
        assert [r.id for r in db.list_restores(s, P1, run_id=run_a)] == [first.id]
        assert [r.id for r in db.list_restores(s, P1, status="queued")] == [second.id]
        assert [r.id for r in db.list_restores(s, P1, restore_type="in_place")] == [second.id]
        assert [r.id for r in db.list_restores(s, P1, limit=1, marker=second.id)] == [first.id]


def test_only_a_finished_restore_record_is_deleted(raksha_db: Database) -> None:
    _job, run_id = finished_run(raksha_db)
    with raksha_db.begin() as s:
        restore = db.create_restore(s, P1, USER, run_id)
        with pytest.raises(Conflict):
            db.delete_restore(s, P1, restore.id)
        db.transition_restore(s, P1, restore.id, "cancelled")
        db.delete_restore(s, P1, restore.id)
        assert db.list_restores(s, P1) == []


def test_a_restarted_service_finds_the_runs_and_restores_left_unfinished(raksha_db: Database) -> None:
    _job, run_id = finished_run(raksha_db)
    with raksha_db.begin() as s:
        restore = db.create_restore(s, P1, USER, run_id)
        job = db.create_job(s, P2, USER, name="other", vms=["vm"])
        stuck = db.create_run(s, P2, USER, job.id, backuptype="full")
        db.transition_run(s, P2, stuck.id, "snapshotting")
    with raksha_db.begin() as s:
        assert [r.id for r in db.unfinished_runs(s)] == [stuck.id]
        assert [r.id for r in db.unfinished_restores(s)] == [restore.id]
        # recovery fails the stuck run; that frees its job
        db.transition_run(s, P2, stuck.id, "error", error_code="INTERRUPTED", error_message="service restarted")
        assert db.get_job(s, P2, job.id).active_run_id is None
        assert db.unfinished_runs(s) == []
