"""Hard deletion of rows soft-deleted long enough ago (``raksha db purge``, like ``nova-manage db purge``).

The service only ever soft-deletes; this removes for good the rows whose ``deleted_at`` is before a cutoff:
restores, runs with their VMs, disks and disk backups, jobs with their VM lists (and the replaced VM rows of
live jobs), vault services. Children go before their parents, in batches, each batch its own short
transaction. A row is never purged while a row that stays refers to it:

- a run stays while any of its VMs, disks or backups is live or deleted after the cutoff (a deleted run's
  backup kept as the backing of a later run's backup is live: see ``deletable_backups``), while a restore of it
  stays, and while a run that stays has it as ``parent_run_id`` or a backup of a run that stays has one of
  its backups as ``vm_resource_backup_backing_id`` (so a backing chain goes only as a whole, newest first);
- a job stays while any run of it stays; a vault service while any job that stays uses it.

``purge_deleted(database, before)`` plans first (one read), then deletes; ``dry_run`` only plans, and reports
what the deletion would remove. Rows are never undeleted and nothing new refers to a deleted row, so the
plan holds while the service runs; each delete also re-checks that the rows it removes are deleted before
the cutoff, and a foreign key stops it rather than let a row that stays lose its parent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, and_, delete, func, select, update
from sqlalchemy.orm import Session, aliased

from raksha.db.engine import Database
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
from raksha.domain.errors import InvalidInput

#: The tables purged, children before parents (the order of the counts).
TABLES = ("restores", "vm_resource_backups", "backupjobrun_vm_resources", "backupjobrun_vms", "backupjobruns",
          "backupjob_vms", "backupjobs", "vault_services")
DEFAULT_BATCH = 500
_IN_CHUNK = 500  # ids per IN (...) list while planning

Run, RunVm, Resource, Backup = BackupJobRun, BackupJobRunVm, BackupJobRunVmResource, VmResourceBackup


def _old(model: type[Base], before: datetime) -> ColumnElement[bool]:
    """The row is soft-deleted, before ``before``."""
    return and_(model.deleted.is_(True), model.deleted_at.is_not(None), model.deleted_at < before)


def _chunks(ids: Sequence[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(ids), size):
        yield list(ids[i:i + size])


@dataclass
class PurgePlan:
    """What a purge removes: the ids of the top rows (their children follow them), in deletion order."""

    before: datetime
    restores: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)  # a run before any run it refers to
    jobs: list[str] = field(default_factory=list)
    job_vms: list[str] = field(default_factory=list)  # replaced VM rows of live jobs
    vault_services: list[str] = field(default_factory=list)


def plan_purge(session: Session, before: datetime) -> PurgePlan:
    """Which rows a purge of everything soft-deleted before ``before`` removes (every project)."""
    plan = PurgePlan(before)
    plan.restores = list(session.execute(select(Restore.id).where(_old(Restore, before))
                                         .order_by(Restore.deleted_at, Restore.id)).scalars())
    plan.runs = _purgeable_runs(session, before)
    purged_runs = set(plan.runs)

    old_jobs = list(session.execute(select(BackupJob.id).where(_old(BackupJob, before))
                                    .order_by(BackupJob.deleted_at, BackupJob.id)).scalars())
    kept_jobs: set[str] = set()
    for chunk in _chunks(old_jobs, _IN_CHUNK):
        for job_id, run_id in session.execute(select(Run.backupjob_id, Run.id).where(Run.backupjob_id.in_(chunk))):
            if run_id not in purged_runs:
                kept_jobs.add(job_id)
    plan.jobs = [j for j in old_jobs if j not in kept_jobs]
    purged_jobs = set(plan.jobs)
    # A deleted job's VM rows go with it; a live job's replaced ones on their own.
    plan.job_vms = list(session.execute(
        select(BackupJobVm.id).join(BackupJob, BackupJobVm.backupjob_id == BackupJob.id)
        .where(_old(BackupJobVm, before), BackupJob.deleted.is_(False))
        .order_by(BackupJobVm.deleted_at, BackupJobVm.id)).scalars())

    old_vaults = list(session.execute(select(VaultService.id).where(_old(VaultService, before))
                                      .order_by(VaultService.deleted_at, VaultService.id)).scalars())
    used: set[str] = set()
    for chunk in _chunks(old_vaults, _IN_CHUNK):
        for job_id, vault_id in session.execute(select(BackupJob.id, BackupJob.vault_service_id)
                                                .where(BackupJob.vault_service_id.in_(chunk))):
            if job_id not in purged_jobs and vault_id is not None:
                used.add(vault_id)
    plan.vault_services = [v for v in old_vaults if v not in used]
    return plan


def _purgeable_runs(session: Session, before: datetime) -> list[str]:
    """Runs soft-deleted before ``before`` with nothing that stays referring to them, a run before those it
    refers to (each a run's parent run or holds its backups' backing)."""
    live_child = [
        select(RunVm.id).where(RunVm.backupjobrun_id == Run.id, ~_old(RunVm, before)).exists(),
        select(Resource.id).where(Resource.backupjobrun_id == Run.id, ~_old(Resource, before)).exists(),
        select(Backup.id).join(Resource, Backup.backupjobrun_vm_resource_id == Resource.id)
        .where(Resource.backupjobrun_id == Run.id, ~_old(Backup, before)).exists(),
        select(Restore.id).where(Restore.backupjobrun_id == Run.id, ~_old(Restore, before)).exists(),
    ]
    candidates = list(session.execute(select(Run.id).where(_old(Run, before), *[~c for c in live_child])
                                      .order_by(Run.created_at, Run.id)).scalars())
    if not candidates:
        return []
    # Who refers to a candidate: (referrer run, referred run).
    refers_to: dict[str, set[str]] = {}
    referred_by: dict[str, set[str]] = {}
    referring, referred = aliased(Backup), aliased(Resource)
    for chunk in _chunks(candidates, _IN_CHUNK):
        edges: list[Any] = list(session.execute(select(Run.id, Run.parent_run_id).where(Run.parent_run_id.in_(chunk))))
        edges += session.execute(
            select(Resource.backupjobrun_id, referred.backupjobrun_id).select_from(referring)
            .join(Backup, referring.vm_resource_backup_backing_id == Backup.id)
            .join(referred, Backup.backupjobrun_vm_resource_id == referred.id)
            .join(Resource, referring.backupjobrun_vm_resource_id == Resource.id)
            .where(referred.backupjobrun_id.in_(chunk), Resource.backupjobrun_id != referred.backupjobrun_id)
            .distinct())
        for src, dst in edges:
            refers_to.setdefault(src, set()).add(dst)
            referred_by.setdefault(dst, set()).add(src)
    # What a run that stays refers to stays too, down the chain.
    purgeable = set(candidates)
    staying = [src for src in refers_to if src not in purgeable]
    while staying:
        for dst in refers_to.get(staying.pop(), ()):
            if dst in purgeable:
                purgeable.discard(dst)
                staying.append(dst)
    # Referrers first: a run once every purgeable run referring to it is placed.
    waiting = {r: len(referred_by.get(r, set()) & purgeable) for r in purgeable}
    ready = [r for r in candidates if r in purgeable and waiting[r] == 0]
    order: list[str] = []
    while ready:
        run_id = ready.pop()
        order.append(run_id)
        for dst in sorted(refers_to.get(run_id, ())):
            if dst in purgeable:
                waiting[dst] -= 1
                if waiting[dst] == 0:
                    ready.append(dst)
    return order  # a cycle (never made: a run refers only to older ones) would stay


# ---------------------------------------------------------------- deleting

def _rows(session: Session, stmt: Any) -> int:
    return int(cast(CursorResult[Any], session.execute(stmt.execution_options(synchronize_session=False))).rowcount)


def _delete_runs(session: Session, run_ids: list[str], before: datetime) -> dict[str, int]:
    runs = select(Run.id).where(Run.id.in_(run_ids), _old(Run, before))
    resources = select(Resource.id).where(Resource.backupjobrun_id.in_(runs))
    # References inside the batch first (a batch may hold a run and the run it refers to).
    session.execute(update(Backup).where(Backup.backupjobrun_vm_resource_id.in_(resources))
                    .values(vm_resource_backup_backing_id=None).execution_options(synchronize_session=False))
    session.execute(update(Run).where(Run.id.in_(run_ids), _old(Run, before)).values(parent_run_id=None)
                    .execution_options(synchronize_session=False))
    return {
        "vm_resource_backups": _rows(session, delete(Backup).where(Backup.backupjobrun_vm_resource_id.in_(resources),
                                                                   _old(Backup, before))),
        "backupjobrun_vm_resources": _rows(session, delete(Resource).where(Resource.backupjobrun_id.in_(runs),
                                                                           _old(Resource, before))),
        "backupjobrun_vms": _rows(session, delete(RunVm).where(RunVm.backupjobrun_id.in_(runs), _old(RunVm, before))),
        "backupjobruns": _rows(session, delete(Run).where(Run.id.in_(run_ids), _old(Run, before))),
    }


def _count_runs(session: Session, run_ids: list[str], before: datetime) -> dict[str, int]:
    def count(model: type[Base], *where: Any) -> int:
        return int(session.execute(select(func.count()).select_from(model).where(*where)).scalar_one())

    return {
        "vm_resource_backups": count(Backup, Backup.backupjobrun_vm_resource_id.in_(
            select(Resource.id).where(Resource.backupjobrun_id.in_(run_ids))), _old(Backup, before)),
        "backupjobrun_vm_resources": count(Resource, Resource.backupjobrun_id.in_(run_ids), _old(Resource, before)),
        "backupjobrun_vms": count(RunVm, RunVm.backupjobrun_id.in_(run_ids), _old(RunVm, before)),
        "backupjobruns": len(run_ids),
    }


def _delete_old(session: Session, model: type[Restore] | type[BackupJobVm] | type[VaultService], ids: list[str],
                before: datetime) -> int:
    return _rows(session, delete(model).where(model.id.in_(ids), _old(model, before)))


def _delete_jobs(session: Session, job_ids: list[str], before: datetime) -> dict[str, int]:
    jobs = select(BackupJob.id).where(BackupJob.id.in_(job_ids), _old(BackupJob, before))
    return {"backupjob_vms": _rows(session, delete(BackupJobVm).where(BackupJobVm.backupjob_id.in_(jobs))),
            "backupjobs": _rows(session, delete(BackupJob).where(BackupJob.id.in_(job_ids), _old(BackupJob, before)))}


def _add(total: dict[str, int], counts: dict[str, int]) -> None:
    for table, n in counts.items():
        total[table] += n


def purge_deleted(database: Database, before: datetime, *, batch_size: int = DEFAULT_BATCH,
                  dry_run: bool = False) -> dict[str, int]:
    """Remove every row soft-deleted before ``before`` that nothing staying refers to; the rows removed per
    table (``TABLES`` order). ``batch_size`` top rows (restores, runs with their children, jobs...) per
    transaction. ``dry_run``: remove nothing, count what would go."""
    if batch_size < 1:
        raise InvalidInput(f"batch size must be at least 1, not {batch_size}", code="VALUE_INVALID",
                           field="batch_size")
    with database.read() as s:
        plan = plan_purge(s, before)
    total = dict.fromkeys(TABLES, 0)
    if dry_run:
        with database.read() as s:
            for chunk in _chunks(plan.runs, _IN_CHUNK):
                _add(total, _count_runs(s, chunk, before))
            for chunk in _chunks(plan.jobs, _IN_CHUNK):
                total["backupjob_vms"] += int(s.execute(select(func.count()).select_from(BackupJobVm).where(
                    BackupJobVm.backupjob_id.in_(chunk))).scalar_one())
        total["restores"] = len(plan.restores)
        total["backupjob_vms"] += len(plan.job_vms)
        total["backupjobs"] = len(plan.jobs)
        total["vault_services"] = len(plan.vault_services)
        return total

    steps: list[tuple[list[str], Callable[[Session, list[str]], dict[str, int]]]] = [
        (plan.restores, lambda s, ids: {"restores": _delete_old(s, Restore, ids, before)}),
        (plan.runs, lambda s, ids: _delete_runs(s, ids, before)),
        (plan.job_vms, lambda s, ids: {"backupjob_vms": _delete_old(s, BackupJobVm, ids, before)}),
        (plan.jobs, lambda s, ids: _delete_jobs(s, ids, before)),
        (plan.vault_services, lambda s, ids: {"vault_services": _delete_old(s, VaultService, ids, before)}),
    ]
    for ids, delete_batch in steps:  # children before parents
        for chunk in _chunks(ids, batch_size):
            with database.begin() as s:
                _add(total, delete_batch(s, chunk))
    return total
