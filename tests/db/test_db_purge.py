"""``raksha db purge``: rows soft-deleted before a cutoff are removed for good, children first, in batches,
never a run a live backup chain still needs. On SQLite, and in the slow runs on real PostgreSQL and MariaDB."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from conftest import run_raksha
from raksha.db import Database
from raksha.db import api as db
from raksha.db.api.purge import TABLES
from raksha.db.models import (
    BackupJob,
    BackupJobRun,
    BackupJobRunVm,
    BackupJobRunVmResource,
    BackupJobVm,
    Base,
    Restore,
    VaultService,
    VmResourceBackup,
)
from raksha.db.types import utcnow

P, USER = "project-1", "user-1"
MODELS: dict[str, type[Base]] = {"restores": Restore, "vm_resource_backups": VmResourceBackup,
                                 "backupjobrun_vm_resources": BackupJobRunVmResource,
                                 "backupjobrun_vms": BackupJobRunVm, "backupjobruns": BackupJobRun,
                                 "backupjob_vms": BackupJobVm, "backupjobs": BackupJob,
                                 "vault_services": VaultService}
ZERO = dict.fromkeys(TABLES, 0)


def make_job(raksha_db: Database, vms: tuple[str, ...] = ("vm-a",), vault_id: str | None = None) -> str:
    with raksha_db.begin() as s:
        return db.create_job(s, P, USER, name="app", vms=list(vms), vault_service_id=vault_id).id


def back_up(raksha_db: Database, job_id: str, parent: str | None = None, *, backing: bool = True) -> str:
    """An available run, one disk per VM; an incremental of ``parent`` (its backups as backing unless
    ``backing`` is False: a disk read in full)."""
    with raksha_db.begin() as s:
        run = db.create_run(s, P, USER, job_id, backuptype="incremental" if parent else "full",
                            parent_run_id=parent)
        parent_backups = ({vm.vm_id: vm.resources[0].backups[0].id for vm in db.get_run(s, P, parent).vms}
                          if parent and backing else {})
        db.transition_run(s, P, run.id, "snapshotting")
        db.transition_run(s, P, run.id, "uploading")
        for vm in run.vms:
            db.transition_run_vm(s, P, vm.id, "snapshotting")
            db.transition_run_vm(s, P, vm.id, "uploading")
            disk = db.add_run_vm_resource(s, P, vm.id, resource_name="vda", status="available")
            backup = db.add_vm_resource_backup(s, P, disk.id,
                                               vm_resource_backup_backing_id=parent_backups.get(vm.vm_id))
            db.transition_vm_resource_backup(s, P, backup.id, "available")
            db.transition_run_vm(s, P, vm.id, "available")
        return db.settle_run(s, P, run.id).id


def delete_run(raksha_db: Database, run_id: str) -> None:
    """As the orchestrator deletes a run: the backups no other run references, the run, then the orphans."""
    with raksha_db.begin() as s:
        db.transition_run(s, P, run_id, "deleting")
        for b in db.deletable_backups(s, P, run_id):
            db.transition_vm_resource_backup(s, P, b.id, "deleting")
            db.transition_vm_resource_backup(s, P, b.id, "deleted")
        db.transition_run(s, P, run_id, "deleted")
    while True:
        with raksha_db.begin() as s:
            orphans = db.orphaned_backups(s, P)
            for b in orphans:
                db.transition_vm_resource_backup(s, P, b.id, "deleting")
                db.transition_vm_resource_backup(s, P, b.id, "deleted")
        if not orphans:
            return


def age(raksha_db: Database, days: float, *, only: tuple[type[Base], list[str]] | None = None) -> None:
    """Every soft-deleted row (or ``only`` these of one table) deleted ``days`` days ago."""
    when = utcnow() - timedelta(days=days)
    with raksha_db.begin() as s:
        for model in MODELS.values():
            if only is not None and model is not only[0]:
                continue
            stmt = update(model).where(model.deleted.is_(True)).values(deleted_at=when)
            if only is not None:
                stmt = stmt.where(model.id.in_(only[1]))
            s.execute(stmt.execution_options(synchronize_session=False))


def counts(raksha_db: Database) -> dict[str, int]:
    """Rows per table, deleted or not."""
    with raksha_db.read() as s:
        return {t: int(s.execute(select(func.count()).select_from(m)).scalar_one()) for t, m in MODELS.items()}


def exists(raksha_db: Database, model: type[Base], row_id: str) -> bool:
    with raksha_db.read() as s:
        return s.execute(select(model.id).where(model.id == row_id)).scalar_one_or_none() is not None


def month_ago() -> datetime:
    return utcnow() - timedelta(days=30)


def test_nothing_soft_deleted_nothing_purged(raksha_db: Database) -> None:
    job = make_job(raksha_db)
    run = back_up(raksha_db, job)
    with raksha_db.begin() as s:
        db.create_restore(s, P, USER, run, restore_type="files")
    before = counts(raksha_db)
    future = utcnow() + timedelta(days=1)
    assert db.purge_deleted(raksha_db, future, dry_run=True) == ZERO
    assert db.purge_deleted(raksha_db, future) == ZERO
    assert counts(raksha_db) == before


@pytest.mark.parametrize("batch_size", [1, 500])
def test_rows_deleted_before_the_cutoff_go_children_first_and_a_dry_run_counts_the_same(
        raksha_db: Database, batch_size: int) -> None:
    with raksha_db.begin() as s:
        vault = db.create_vault_service(s, P, USER, name="old", type="local", url="file:///old").id
    gone_job = make_job(raksha_db, ("vm-a", "vm-b"), vault_id=vault)
    gone_run = back_up(raksha_db, gone_job)
    with raksha_db.begin() as s:
        restore = db.create_restore(s, P, USER, gone_run, restore_type="files")
        db.transition_restore(s, P, restore.id, "cancelled")
        db.delete_restore(s, P, restore.id)
    delete_run(raksha_db, gone_run)
    with raksha_db.begin() as s:
        db.delete_job(s, P, gone_job)
        db.delete_vault_service(s, P, vault)
    kept_job = make_job(raksha_db, ("vm-old",))
    with raksha_db.begin() as s:
        db.update_job(s, P, kept_job, vms=["vm-new"])  # the old VM row is soft-deleted
    kept_run = back_up(raksha_db, kept_job)
    young_job = make_job(raksha_db)
    with raksha_db.begin() as s:
        db.delete_job(s, P, young_job)
    age(raksha_db, 40)
    age(raksha_db, 1, only=(BackupJob, [young_job]))  # its VM rows, deleted with it long ago, stay with it
    before = counts(raksha_db)

    expected = {"restores": 1, "vm_resource_backups": 2, "backupjobrun_vm_resources": 2, "backupjobrun_vms": 2,
                "backupjobruns": 1, "backupjob_vms": 3, "backupjobs": 1, "vault_services": 1}
    assert db.purge_deleted(raksha_db, month_ago(), batch_size=batch_size, dry_run=True) == expected
    assert counts(raksha_db) == before  # a dry run removes nothing
    assert db.purge_deleted(raksha_db, month_ago(), batch_size=batch_size) == expected
    assert counts(raksha_db) == {t: before[t] - expected[t] for t in TABLES}
    assert list(db.purge_deleted(raksha_db, month_ago(), batch_size=batch_size).values()) == [0] * len(TABLES)
    for model, row_id in ((BackupJobRun, gone_run), (BackupJob, gone_job), (VaultService, vault),
                          (Restore, restore.id)):
        assert not exists(raksha_db, model, row_id)
    # What stays: the live job with its current VM and run, the job deleted a day ago.
    with raksha_db.begin() as s:
        assert [vm.vm_id for vm in db.get_job(s, P, kept_job).vms] == ["vm-new"]
        assert db.get_run(s, P, kept_run).vms[0].resources[0].backups[0].status == "available"
    assert exists(raksha_db, BackupJob, young_job) and len(_job_vms(raksha_db, young_job)) == 1


def _job_vms(raksha_db: Database, job_id: str) -> list[BackupJobVm]:
    with raksha_db.read() as s:
        return list(s.execute(select(BackupJobVm).where(BackupJobVm.backupjob_id == job_id)).scalars())


def test_a_run_a_live_backup_chain_needs_is_never_purged(raksha_db: Database) -> None:
    job = make_job(raksha_db, ("vm-a", "vm-b"))
    full = back_up(raksha_db, job)
    incr1 = back_up(raksha_db, job, full)
    incr2 = back_up(raksha_db, job, incr1)
    # The full and the first incremental deleted long ago: their backups are the live incremental's chain.
    delete_run(raksha_db, full)
    delete_run(raksha_db, incr1)
    age(raksha_db, 40)
    assert db.purge_deleted(raksha_db, month_ago(), dry_run=True) == ZERO
    assert db.purge_deleted(raksha_db, month_ago()) == ZERO
    assert exists(raksha_db, BackupJobRun, full) and exists(raksha_db, BackupJobRun, incr1)
    # The last one deleted a day ago: the chain's backups are deleted now (orphans), but the newest run is
    # young and its backups still refer to the older ones: nothing of the chain goes yet.
    delete_run(raksha_db, incr2)
    age(raksha_db, 1, only=(BackupJobRun, [incr2]))
    assert db.purge_deleted(raksha_db, month_ago()) == ZERO
    # Once the newest is old too, the whole chain goes, newest first (one run per batch: no batch holds a run
    # and the run it refers to, so a foreign key checked row by row never sees a dangling reference).
    age(raksha_db, 40)
    expected = {**ZERO, "vm_resource_backups": 6, "backupjobrun_vm_resources": 6, "backupjobrun_vms": 6,
                "backupjobruns": 3}
    assert db.purge_deleted(raksha_db, month_ago(), batch_size=1, dry_run=True) == expected
    assert db.purge_deleted(raksha_db, month_ago(), batch_size=1) == expected
    for run in (full, incr1, incr2):
        assert not exists(raksha_db, BackupJobRun, run)
    with raksha_db.begin() as s:
        assert db.get_job(s, P, job).id == job


def test_a_chain_goes_in_one_batch_too(raksha_db: Database) -> None:
    job = make_job(raksha_db)
    runs = [back_up(raksha_db, job)]
    for _ in range(3):
        runs.append(back_up(raksha_db, job, runs[-1]))
    for run in reversed(runs):
        delete_run(raksha_db, run)
    age(raksha_db, 40)
    done = db.purge_deleted(raksha_db, month_ago())
    assert done["backupjobruns"] == 4 and done["vm_resource_backups"] == 4
    assert counts(raksha_db)["backupjobruns"] == 0


def test_the_parent_of_a_run_that_stays_stays(raksha_db: Database) -> None:
    job = make_job(raksha_db)
    full = back_up(raksha_db, job)
    incr = back_up(raksha_db, job, full, backing=False)  # read in full, but built on the full run
    delete_run(raksha_db, full)  # nothing refers to its backups: deleted with it
    age(raksha_db, 40)
    assert db.purge_deleted(raksha_db, month_ago()) == ZERO
    delete_run(raksha_db, incr)
    age(raksha_db, 40)
    assert db.purge_deleted(raksha_db, month_ago())["backupjobruns"] == 2


def test_a_deleted_job_stays_while_its_runs_do_and_its_vault_with_it(raksha_db: Database) -> None:
    with raksha_db.begin() as s:
        vault = db.create_vault_service(s, P, USER, name="v", type="local", url="file:///v").id
    job = make_job(raksha_db, vault_id=vault)
    run = back_up(raksha_db, job)
    with raksha_db.begin() as s:
        db.delete_job(s, P, job)  # its runs stay until deleted on their own
        db.delete_vault_service(s, P, vault)
    age(raksha_db, 40)
    assert db.purge_deleted(raksha_db, month_ago()) == ZERO  # a deleted job's VM rows go with it
    assert exists(raksha_db, BackupJob, job) and exists(raksha_db, VaultService, vault)
    # A restore record of the run (deleted only yesterday) keeps the run once it is deleted.
    with raksha_db.begin() as s:
        restore = db.create_restore(s, P, USER, run, restore_type="files")
        db.transition_restore(s, P, restore.id, "cancelled")
        db.delete_restore(s, P, restore.id)
    delete_run(raksha_db, run)
    age(raksha_db, 40)
    age(raksha_db, 1, only=(Restore, [restore.id]))
    assert db.purge_deleted(raksha_db, month_ago()) == ZERO
    age(raksha_db, 40)
    assert db.purge_deleted(raksha_db, month_ago()) == {
        "restores": 1, "vm_resource_backups": 1, "backupjobrun_vm_resources": 1, "backupjobrun_vms": 1,
        "backupjobruns": 1, "backupjob_vms": 1, "backupjobs": 1, "vault_services": 1}
    assert counts(raksha_db) == ZERO


def test_raksha_db_purge_from_the_command_line(raksha_db: Database) -> None:
    url = raksha_db.url.render_as_string(hide_password=False)
    job = make_job(raksha_db)
    delete_run(raksha_db, back_up(raksha_db, job))
    age(raksha_db, 10)

    def purge(*args: str) -> Any:
        rc, out, err = run_raksha("db", "purge", "--url", url, *args)
        assert rc == 0 and "Traceback" not in err, err
        return out

    assert json.loads(purge("--before", "30", "--json"))["total"] == 0  # deleted 10 days ago: younger
    dry = json.loads(purge("--before", "7", "--dry-run", "--json"))
    assert dry["dry_run"] and dry["rows"]["backupjobruns"] == 1 and dry["total"] == 4
    assert counts(raksha_db)["backupjobruns"] == 1
    text = purge("--before", "7", "--batch-size", "1")
    assert "purged 4 rows soft-deleted before" in text and "backupjobruns" in text
    assert counts(raksha_db)["backupjobruns"] == 0
    for bad in (["--before", "-1"], ["--before", "1", "--batch-size", "0"]):
        rc, _out, err = run_raksha("db", "purge", "--url", url, *bad)
        assert rc == 2 and "[USAGE]" in err, err
