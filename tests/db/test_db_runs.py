"""Runs in the database: the life cycle through the state machine, one run per job at a time, and
what deleting a run may delete. On SQLite, and in the slow runs on real PostgreSQL and MariaDB."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from raksha.db import Database
from raksha.db import api as db
from raksha.db.models import BackupJobRun, VmResourceBackup
from raksha.domain.errors import Conflict, InvalidInput, InvalidStateTransition, JobBusy, NotFound, StatusChanged

P1, P2, USER = "project-1", "project-2", "user-1"


def make_job(raksha_db: Database, vms: tuple[str, ...] = ("vm-a", "vm-b"), project: str = P1) -> str:
    with raksha_db.begin() as s:
        return db.create_job(s, project, USER, name="app", vms=list(vms)).id


def back_up(raksha_db: Database, job_id: str, outcome: dict[str, str] | None = None, *, backuptype: str = "full",
            parent: BackupJobRun | None = None) -> BackupJobRun:
    """A whole run as the orchestration will drive it; ``outcome`` maps a VM to its end (default available).

    Each VM gets one disk ``vda`` whose backup's backing is the parent run's backup of the same disk.
    """
    outcome = outcome or {}
    with raksha_db.begin() as s:
        run = db.create_run(s, P1, USER, job_id, backuptype=backuptype, parent_run_id=parent.id if parent else None)
    with raksha_db.begin() as s:
        db.transition_run(s, P1, run.id, "snapshotting", expected="queued")
        for vm in run.vms:
            db.transition_run_vm(s, P1, vm.id, "snapshotting")
        db.transition_run(s, P1, run.id, "uploading", consistency="filesystem", freeze_ms=52)
        for vm in run.vms:
            end = outcome.get(vm.vm_id, "available")
            if end == "error":
                db.transition_run_vm(s, P1, vm.id, "error", error_code="SOURCE_IO", error_message="disk vanished")
                continue
            db.transition_run_vm(s, P1, vm.id, "uploading")
            disk = db.add_run_vm_resource(s, P1, vm.id, resource_name="vda", bus="virtio", disk_format="qcow2",
                                          size=1 << 30, backuptype=backuptype, tracking="full read")
            backing = None
            if parent is not None:
                backing = next(b.id for pvm in parent.vms if pvm.vm_id == vm.vm_id
                               for r in pvm.resources for b in r.backups)
            backup = db.add_vm_resource_backup(
                s, P1, disk.id, vm_resource_backup_backing_id=backing, vault_service_id=None,
                vault_service_url="file:///var/lib/raksha/vault", vault_service_metadata={"format": "raw"},
                vault_backup_id=f"{job_id}/{run.id}/{vm.vm_id}/vda")
            db.update_vm_resource_backup(s, P1, backup.id, bytes_read=4096, bytes_stored=1024)
            db.transition_vm_resource_backup(s, P1, backup.id, "available")
            for stage in ("snapshotting", "uploading", "available"):
                db.transition_run_vm_resource(s, P1, disk.id, stage)
            db.transition_run_vm(s, P1, vm.id, "available", bytes_read=4096, bytes_stored=1024)
        return db.settle_run(s, P1, run.id, progress_percent=100)


def test_a_run_goes_from_queued_to_available_with_its_vms_disks_and_backups(raksha_db: Database) -> None:
    job_id = make_job(raksha_db)
    run = back_up(raksha_db, job_id)
    assert run.status == "available" and run.backuptype == "full" and run.progress_percent == 100
    assert run.started_at is not None and run.finished_at is not None and run.finished_at >= run.started_at
    assert run.consistency == "filesystem" and run.freeze_ms == 52
    with raksha_db.begin() as s:
        shown = db.get_run(s, P1, run.id, job_id=job_id)
    assert sorted(vm.vm_id for vm in shown.vms) == ["vm-a", "vm-b"]
    for vm in shown.vms:
        assert vm.status == "available" and vm.finished_at is not None
        (disk,) = vm.resources
        assert (disk.resource_name, disk.bus, disk.status) == ("vda", "virtio", "available")
        (backup,) = disk.backups
        assert backup.status == "available" and backup.top and backup.vm_resource_backup_backing_id is None
        assert backup.vault_service_metadata == {"format": "raw"} and backup.bytes_stored == 1024


def test_one_vm_failing_makes_the_run_partial_and_says_which(raksha_db: Database) -> None:
    run = back_up(raksha_db, make_job(raksha_db), {"vm-b": "error"})
    assert run.status == "partial"
    failed = {vm.vm_id: (vm.status, vm.error_code) for vm in run.vms}
    assert failed == {"vm-a": ("available", None), "vm-b": ("error", "SOURCE_IO")}


def test_every_vm_failing_makes_the_run_an_error(raksha_db: Database) -> None:
    run = back_up(raksha_db, make_job(raksha_db), {"vm-a": "error", "vm-b": "error"})
    assert run.status == "error"


def test_a_job_never_has_two_runs_at_once(raksha_db: Database) -> None:
    job_id = make_job(raksha_db)
    with raksha_db.begin() as s:
        first = db.create_run(s, P1, USER, job_id, backuptype="full")
    with raksha_db.begin() as s:
        with pytest.raises(JobBusy) as caught:
            db.create_run(s, P1, USER, job_id, backuptype="incremental")
        assert caught.value.details["run_id"] == first.id and caught.value.retryable
        assert [r.id for r in db.active_runs(s, P1, job_id)] == [first.id]
        assert db.get_job(s, P1, job_id).active_run_id == first.id
    with raksha_db.begin() as s:
        db.transition_run(s, P1, first.id, "cancelled")  # a queued run is cancelled at once
    with raksha_db.begin() as s:
        assert db.active_runs(s, P1, job_id) == []
        second = db.create_run(s, P1, USER, job_id, backuptype="full")
        job = db.get_job(s, P1, job_id)
    assert job.active_run_id == second.id and job.runs_started == 2


def test_a_refused_transition_changes_nothing(raksha_db: Database) -> None:
    job_id = make_job(raksha_db)
    with raksha_db.begin() as s:
        run = db.create_run(s, P1, USER, job_id, backuptype="full")
    with raksha_db.begin() as s, pytest.raises(InvalidStateTransition) as caught:
        db.transition_run(s, P1, run.id, "available", progress_percent=100)
    assert caught.value.code == "INVALID_STATE_TRANSITION"
    with raksha_db.begin() as s:
        again = db.get_run(s, P1, run.id)
        assert (again.status, again.progress_percent) == ("queued", 0)
        with pytest.raises(InvalidInput) as bad:
            db.update_run(s, P1, run.id, status="available")
        assert bad.value.code == "FIELD_NOT_UPDATABLE"
        with pytest.raises(StatusChanged):
            db.transition_run(s, P1, run.id, "error", expected="uploading")
        with pytest.raises(NotFound):
            db.transition_run(s, P2, run.id, "error")


def test_progress_is_recorded_without_touching_the_status(raksha_db: Database) -> None:
    job_id = make_job(raksha_db)
    with raksha_db.begin() as s:
        run = db.create_run(s, P1, USER, job_id, backuptype="full", description="before the upgrade")
    with raksha_db.begin() as s:
        db.transition_run(s, P1, run.id, "snapshotting")
        db.transition_run(s, P1, run.id, "uploading")
        run = db.update_run(s, P1, run.id, progress_percent=40, bytes_done=400, bytes_total=1000, eta_seconds=12)
    assert (run.status, run.progress_percent, run.bytes_done, run.bytes_total, run.eta_seconds) == (
        "uploading", 40, 400, 1000, 12)


def test_runs_are_listed_per_job_or_for_the_whole_project_with_filters(raksha_db: Database) -> None:
    job_a, job_b = make_job(raksha_db), make_job(raksha_db)
    full = back_up(raksha_db, job_a)
    incr = back_up(raksha_db, job_a, backuptype="incremental", parent=full)
    other = back_up(raksha_db, job_b)
    with raksha_db.begin() as s:
        assert [r.id for r in db.list_runs(s, P1, job_id=job_a)] == [incr.id, full.id]
        assert [r.id for r in db.list_runs(s, P1)] == [other.id, incr.id, full.id]
        assert [r.id for r in db.list_runs(s, P1, backuptype="incremental")] == [incr.id]
        assert [r.id for r in db.list_runs(s, P1, job_id=job_a, limit=1, marker=incr.id)] == [full.id]
        assert db.list_runs(s, P2) == []
        detailed = db.list_runs(s, P1, job_id=job_b, details=True)
        assert detailed[0].vms[0].resources[0].backups[0].status == "available"
        assert db.latest_run(s, P1, job_a) is not None
        with pytest.raises(NotFound):
            db.get_run(s, P1, incr.id, job_id=job_b)  # a run is shown under its own job only
        with pytest.raises(NotFound):
            db.list_runs(s, P2, job_id=job_a)


def test_an_incremental_records_its_backing_backup(raksha_db: Database) -> None:
    job_id = make_job(raksha_db, ("vm-a",))
    full = back_up(raksha_db, job_id)
    incr = back_up(raksha_db, job_id, backuptype="incremental", parent=full)
    full_backup = full.vms[0].resources[0].backups[0]
    incr_backup = incr.vms[0].resources[0].backups[0]
    assert incr.parent_run_id == full.id
    assert incr_backup.vm_resource_backup_backing_id == full_backup.id


def test_deleting_a_run_deletes_only_what_no_other_run_references(raksha_db: Database) -> None:
    job_id = make_job(raksha_db, ("vm-a",))
    full = back_up(raksha_db, job_id)
    incr = back_up(raksha_db, job_id, backuptype="incremental", parent=full)
    full_backup = full.vms[0].resources[0].backups[0].id
    incr_backup = incr.vms[0].resources[0].backups[0].id
    with raksha_db.begin() as s:
        assert db.referenced_backup_ids(s, P1, full.id) == {full_backup}
        assert db.deletable_backups(s, P1, full.id) == []
        assert [b.id for b in db.deletable_backups(s, P1, incr.id)] == [incr_backup]
        assert db.referenced_backup_ids(s, P2, full.id) == set()

    # Delete the full: the run goes, its backup stays (the incremental needs it) until nothing does.
    with raksha_db.begin() as s:
        db.transition_run(s, P1, full.id, "deleting")
        assert db.get_job(s, P1, job_id).active_run_id == full.id  # deleting holds the job like a run
        for backup in db.deletable_backups(s, P1, full.id):
            raise AssertionError(f"{backup} should be kept")
        db.transition_run(s, P1, full.id, "deleted")
    with raksha_db.begin() as s:
        with pytest.raises(NotFound):
            db.get_run(s, P1, full.id)
        kept = s.get(VmResourceBackup, full_backup)
        assert kept is not None and not kept.deleted
        assert db.orphaned_backups(s, P1) == []
        assert db.get_job(s, P1, job_id).active_run_id is None

    # Delete the incremental: its own backup is deletable, after which the full's is an orphan.
    with raksha_db.begin() as s:
        db.transition_run(s, P1, incr.id, "deleting")
        for backup in db.deletable_backups(s, P1, incr.id):
            db.transition_vm_resource_backup(s, P1, backup.id, "deleting")
            db.transition_vm_resource_backup(s, P1, backup.id, "deleted")
        db.transition_run(s, P1, incr.id, "deleted")
    with raksha_db.begin() as s:
        assert [b.id for b in db.orphaned_backups(s, P1)] == [full_backup]
        assert db.list_runs(s, P1, job_id=job_id) == []


def test_the_runs_of_a_deleted_job_can_still_be_deleted(raksha_db: Database) -> None:
    job_id = make_job(raksha_db)
    run = back_up(raksha_db, job_id)
    with raksha_db.begin() as s:
        db.delete_job(s, P1, job_id)
    with raksha_db.begin() as s:
        assert [r.id for r in db.list_runs(s, P1)] == [run.id]  # kept until deleted on their own
        db.transition_run(s, P1, run.id, "deleting")
        assert db.transition_run(s, P1, run.id, "deleted").deleted


def test_a_run_being_restored_is_not_deleted(raksha_db: Database) -> None:
    run = back_up(raksha_db, make_job(raksha_db))
    with raksha_db.begin() as s:
        restore = db.create_restore(s, P1, USER, run.id)
    with raksha_db.begin() as s, pytest.raises(Conflict) as caught:
        db.transition_run(s, P1, run.id, "deleting")
    assert caught.value.code == "RUN_BUSY"
    with raksha_db.begin() as s:
        db.transition_restore(s, P1, restore.id, "cancelled")
        assert db.transition_run(s, P1, run.id, "deleting").status == "deleting"


def test_an_incremental_builds_only_on_a_usable_run_of_the_same_job(raksha_db: Database) -> None:
    job_id, other_job = make_job(raksha_db), make_job(raksha_db)
    failed = back_up(raksha_db, job_id, {"vm-a": "error", "vm-b": "error"})
    elsewhere = back_up(raksha_db, other_job)
    with raksha_db.begin() as s:
        with pytest.raises(Conflict) as caught:
            db.create_run(s, P1, USER, job_id, backuptype="incremental", parent_run_id=failed.id)
        assert caught.value.code == "PARENT_RUN_UNUSABLE"
    with raksha_db.begin() as s, pytest.raises(NotFound):
        db.create_run(s, P1, USER, job_id, backuptype="incremental", parent_run_id=elsewhere.id)
    with raksha_db.begin() as s:
        with pytest.raises(InvalidInput):
            db.create_run(s, P1, USER, job_id, backuptype="differential")
        assert db.latest_run(s, P1, job_id) is None  # the failed run is no parent


def race(raksha_db: Database, workers: int, work: Callable[[Any], Any]) -> tuple[list[Any], list[BaseException]]:
    """Run ``work(session)`` in ``workers`` threads at once, each in its own transaction."""
    barrier = threading.Barrier(workers)
    won: list[Any] = []
    lost: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            with raksha_db.begin() as s:
                won.append(work(s))
        except BaseException as err:
            lost.append(err)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return won, lost


def test_concurrent_run_requests_start_exactly_one_run(raksha_db: Database) -> None:
    job_id = make_job(raksha_db)
    won, lost = race(raksha_db, 4, lambda s: db.create_run(s, P1, USER, job_id, backuptype="full").id)
    assert len(won) == 1, lost
    assert len(lost) == 3 and all(isinstance(err, JobBusy) for err in lost), lost
    with raksha_db.begin() as s:
        assert [r.id for r in db.list_runs(s, P1, job_id=job_id)] == won


def test_two_workers_cannot_both_move_a_run(raksha_db: Database) -> None:
    job_id = make_job(raksha_db)
    with raksha_db.begin() as s:
        run = db.create_run(s, P1, USER, job_id, backuptype="full")
    won, lost = race(raksha_db, 4, lambda s: db.transition_run(s, P1, run.id, "snapshotting").status)
    assert won == ["snapshotting"], lost
    # the losers read the run already moved (INVALID_STATE_TRANSITION) or lost the compare-and-set (STATUS_CHANGED)
    assert len(lost) == 3 and all(isinstance(err, InvalidStateTransition | StatusChanged) for err in lost), lost
