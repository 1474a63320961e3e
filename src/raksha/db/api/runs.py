"""Runs, their VMs, their VMs' resources (disks) and the disks' backups (``vm_resource_backups``).

A job is locked by its run in progress: ``backupjobs.active_run_id`` is set by compare-and-set
when a run is created (or starts deleting) and cleared when that run reaches a terminal
status, in the same transaction as the status change. So a job never has two runs at once,
even with several workers and schedulers, on every backend.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, cast

from sqlalchemy import CursorResult, and_, exists, func, select, update
from sqlalchemy.orm import Session, aliased, selectinload

from raksha.db.api._common import checked_values, columns_of, get_one, live, page, transition, update_row
from raksha.db.api.jobs import get_job
from raksha.db.models import (
    BackupJob,
    BackupJobRun,
    BackupJobRunVm,
    BackupJobRunVmResource,
    Restore,
    VmResourceBackup,
    new_id,
)
from raksha.db.types import utcnow
from raksha.domain.errors import Conflict, InvalidInput, JobBusy, NotFound
from raksha.domain.states import (
    PARENT_RUN_STATUSES,
    RESTORE,
    RUN,
    RUN_VM,
    RUN_VM_RESOURCE,
    VM_RESOURCE_BACKUP,
    RunStatus,
    RunType,
    StateMachine,
    run_outcome,
)

WHAT = "backupjobrun"
_TREE = (selectinload(BackupJobRun.vms).selectinload(BackupJobRunVm.resources)
         .selectinload(BackupJobRunVmResource.backups),)
_RUN_FIELDS = columns_of(BackupJobRun) - {"backupjob_id", "backuptype", "parent_run_id"}
_VM_FIELDS = columns_of(BackupJobRunVm) - {"backupjobrun_id"}
_RESOURCE_FIELDS = columns_of(BackupJobRunVmResource) - {"backupjobrun_id", "backupjobrun_vm_id"}
_BACKUP_FIELDS = columns_of(VmResourceBackup) - {"backupjobrun_vm_resource_id"}


# ---------------------------------------------------------------- the job lock

def _lock_job(session: Session, project_id: str, job_id: str, run_id: str, *, count_run: bool) -> None:
    if not count_run:
        deleted = session.execute(select(BackupJob.deleted).where(BackupJob.id == job_id)).scalar()
        if deleted:
            return  # a deleted job starts no runs: its old runs are deleted without its lock
    values: dict[str, Any] = {"active_run_id": run_id, "updated_at": utcnow()}
    if count_run:
        values["runs_started"] = BackupJob.runs_started + 1
    result = session.execute(
        update(BackupJob).where(BackupJob.id == job_id, BackupJob.active_run_id.is_(None),
                                *live(BackupJob, project_id)).values(**values)
        .execution_options(synchronize_session=False))
    if cast(CursorResult[Any], result).rowcount != 1:
        holder = session.execute(select(BackupJob.active_run_id).where(BackupJob.id == job_id)).scalar()
        raise JobBusy(f"backup job {job_id} already has run {holder} in progress; a job runs one at a time",
                      id=job_id, run_id=holder)


def _unlock_job(session: Session, job_id: str, run_id: str) -> None:
    session.execute(update(BackupJob).where(BackupJob.id == job_id, BackupJob.active_run_id == run_id)
                    .values(active_run_id=None, updated_at=utcnow()).execution_options(synchronize_session=False))


# ---------------------------------------------------------------- runs

def create_run(session: Session, project_id: str, user_id: str, job_id: str, *, backuptype: str,
               name: str | None = None, description: str | None = None, parent_run_id: str | None = None,
               vms: Sequence[tuple[str, str | None]] | None = None) -> BackupJobRun:
    """A ``queued`` run of the job, holding the job's lock (``JOB_BUSY`` if another run holds it).

    Its VMs are the job's (or ``vms``: ``(vm_id, vm_name)`` pairs), each ``queued``. The run
    comes back with its VMs loaded.
    """
    if backuptype not in tuple(RunType):
        raise InvalidInput(f"backup type must be full or incremental, not {backuptype!r}",
                           code="BACKUPTYPE_INVALID", field="backuptype")
    job = get_job(session, project_id, job_id)
    if parent_run_id is not None:
        parent = get_run(session, project_id, parent_run_id, job_id=job.id)
        if parent.status not in PARENT_RUN_STATUSES:
            raise Conflict(f"run {parent.id} is {parent.status}; an incremental builds on an available run",
                           code="PARENT_RUN_UNUSABLE", id=parent.id, status=parent.status)
    run = BackupJobRun(id=new_id(), project_id=project_id, user_id=user_id, backupjob_id=job.id, name=name,
                       description=description, backuptype=backuptype, status=RUN.initial,
                       parent_run_id=parent_run_id)
    _lock_job(session, project_id, job.id, run.id, count_run=True)
    session.add(run)
    session.flush()
    members = vms if vms is not None else [(vm.vm_id, vm.vm_name) for vm in job.vms]
    session.add_all(BackupJobRunVm(project_id=project_id, backupjobrun_id=run.id, vm_id=vm_id, vm_name=vm_name,
                                   status=RUN_VM.initial) for vm_id, vm_name in members)
    session.flush()
    return get_run(session, project_id, run.id)


def get_run(session: Session, project_id: str, run_id: str, *, job_id: str | None = None) -> BackupJobRun:
    """The run with its VMs, their resources and the resources' backups loaded.

    With ``job_id``, the run must belong to that job (``BACKUPJOBRUN_NOT_FOUND`` otherwise).
    """
    run = get_one(session, BackupJobRun, project_id, run_id, options=_TREE, what=WHAT)
    if job_id is not None and run.backupjob_id != job_id:
        raise NotFound(f"no backupjobrun {run_id!r} in backup job {job_id!r}", code="BACKUPJOBRUN_NOT_FOUND",
                       id=run_id)
    return run


def list_runs(session: Session, project_id: str, *, job_id: str | None = None, status: str | None = None,
              backuptype: str | None = None, limit: int | None = None, marker: str | None = None,
              offset: int | None = None, sort_dir: str = "desc", details: bool = False) -> list[BackupJobRun]:
    """The project's runs (of one job with ``job_id``, which must exist), newest first by default.

    ``details`` loads each run's VMs, resources and backups as :func:`get_run` does.
    """
    stmt = select(BackupJobRun).where(*live(BackupJobRun, project_id))
    if job_id is not None:
        get_job(session, project_id, job_id)
        stmt = stmt.where(BackupJobRun.backupjob_id == job_id)
    if status is not None:
        stmt = stmt.where(BackupJobRun.status == status)
    if backuptype is not None:
        stmt = stmt.where(BackupJobRun.backuptype == backuptype)
    if details:
        stmt = stmt.options(*_TREE)
    return page(session, BackupJobRun, stmt, limit=limit, marker=marker, offset=offset, sort_dir=sort_dir)


def update_run(session: Session, project_id: str, run_id: str, /, **values: Any) -> BackupJobRun:
    """Set a run's description, name, progress (``progress_percent``, ``bytes_done``, ``bytes_total``,
    ``eta_seconds``), consistency, times or error; never its status (:func:`transition_run`)."""
    update_row(session, BackupJobRun, project_id, run_id, values, allowed=_RUN_FIELDS, what=WHAT)
    return get_run(session, project_id, run_id)


def transition_run(session: Session, project_id: str, run_id: str, new_status: str, /, *,
                   expected: str | Collection[str] | None = None, **values: Any) -> BackupJobRun:
    """Move a run to ``new_status`` (checked by raksha.domain.states.RUN, compare-and-set on the old status).

    Also: ``started_at`` is stamped on leaving ``queued``, ``finished_at`` on reaching a
    terminal status, where the job's lock is released; ``deleting`` takes the job's lock
    again (and is refused while a restore of the run is in progress); ``deleted`` marks the
    run, its VMs and resources deleted (see :func:`deletable_backups` for its backups).
    Raises ``INVALID_STATE_TRANSITION``, ``STATUS_CHANGED``, ``JOB_BUSY`` or ``RUN_BUSY``;
    on any of them the caller's transaction must be rolled back (``Database.begin`` does).
    """
    run = get_one(session, BackupJobRun, project_id, run_id, what=WHAT)
    now = utcnow()
    if new_status == RunStatus.DELETING:
        busy = session.execute(select(Restore.id).where(Restore.backupjobrun_id == run.id,
                                                        Restore.status.in_(RESTORE.active),
                                                        *live(Restore, project_id)).limit(1)).scalar()
        if busy is not None:
            raise Conflict(f"run {run.id} is being restored by {busy}; delete it when that restore ends",
                           code="RUN_BUSY", id=run.id, restore_id=busy)
        RUN.check(run.status, new_status, resource_id=run.id)
        _lock_job(session, project_id, run.backupjob_id, run.id, count_run=False)
    if run.status == RunStatus.QUEUED and new_status != RunStatus.QUEUED:
        values.setdefault("started_at", now)
    if RUN.is_terminal(new_status) and new_status != RunStatus.DELETED:
        values.setdefault("finished_at", now)
    own = {"deleted": True, "deleted_at": now} if new_status == RunStatus.DELETED else {}
    transition(session, BackupJobRun, RUN, project_id, run.id, new_status, expected=expected, values=values,
               allowed=_RUN_FIELDS, what=WHAT, own_values=own)
    if RUN.is_terminal(new_status):
        _unlock_job(session, run.backupjob_id, run.id)
    if new_status == RunStatus.DELETED:
        for model in (BackupJobRunVm, BackupJobRunVmResource):
            session.execute(update(model).where(model.backupjobrun_id == run.id, *live(model, project_id))
                            .values(deleted=True, deleted_at=now, updated_at=now)
                            .execution_options(synchronize_session=False))
        return session.execute(select(BackupJobRun).where(BackupJobRun.id == run.id)
                               .execution_options(populate_existing=True)).scalar_one()
    return get_run(session, project_id, run.id)


def settle_run(session: Session, project_id: str, run_id: str, /, **values: Any) -> BackupJobRun:
    """End a run whose VMs have all finished with the outcome they add up to (``run_outcome``):
    available, partial, error or cancelled."""
    statuses = session.execute(select(BackupJobRunVm.status).where(
        BackupJobRunVm.backupjobrun_id == run_id, *live(BackupJobRunVm, project_id))).scalars().all()
    return transition_run(session, project_id, run_id, run_outcome(statuses), **values)


def active_runs(session: Session, project_id: str, job_id: str) -> list[BackupJobRun]:
    """Runs of the job that are not terminal (queued, snapshotting, uploading, cancelling, deleting)."""
    stmt = (select(BackupJobRun).where(BackupJobRun.backupjob_id == job_id, BackupJobRun.status.in_(RUN.active),
                                       *live(BackupJobRun, project_id))
            .order_by(BackupJobRun.created_at, BackupJobRun.id))
    return list(session.execute(stmt).scalars())


def latest_run(session: Session, project_id: str, job_id: str, *,
               statuses: Collection[str] = PARENT_RUN_STATUSES) -> BackupJobRun | None:
    """The job's newest run in ``statuses`` (by default: the one an incremental builds on), with its tree."""
    stmt = (select(BackupJobRun).where(BackupJobRun.backupjob_id == job_id, BackupJobRun.status.in_(statuses),
                                       *live(BackupJobRun, project_id))
            .order_by(BackupJobRun.created_at.desc(), BackupJobRun.id.desc()).limit(1).options(*_TREE))
    return session.execute(stmt).scalar_one_or_none()


def last_runs(session: Session, project_id: str, job_ids: Collection[str]) -> dict[str, BackupJobRun]:
    """Each job's newest run (of any status; what a job's ``last_run`` shows), by job id, in one query;
    jobs without a run are left out. The runs come without their VMs."""
    if not job_ids:
        return {}
    newest = (select(BackupJobRun.id, func.row_number().over(
        partition_by=BackupJobRun.backupjob_id, order_by=(BackupJobRun.created_at.desc(), BackupJobRun.id.desc()),
    ).label("rank")).where(BackupJobRun.backupjob_id.in_(list(job_ids)), *live(BackupJobRun, project_id))
        .subquery())
    stmt = select(BackupJobRun).join(newest, and_(newest.c.id == BackupJobRun.id, newest.c.rank == 1))
    return {run.backupjob_id: run for run in session.execute(stmt).scalars()}


# ---------------------------------------------------------------- VMs and resources of a run

def add_run_vm(session: Session, project_id: str, run_id: str, /, *, vm_id: str, vm_name: str | None = None,
               **values: Any) -> BackupJobRunVm:
    """Add a VM to a run that is not terminal (a run normally gets its job's VMs at creation)."""
    run = get_one(session, BackupJobRun, project_id, run_id, what=WHAT)
    if RUN.is_terminal(run.status):
        raise Conflict(f"run {run.id} is {run.status}; VMs are added only while it works",
                       code="RUN_FINISHED", id=run.id, status=run.status)
    vm = BackupJobRunVm(project_id=project_id, backupjobrun_id=run.id, vm_id=vm_id, vm_name=vm_name,
                        status=RUN_VM.initial, **checked_values(values, _VM_FIELDS, "backupjobrun_vm"))
    session.add(vm)
    session.flush()
    return vm


def add_run_vm_resource(session: Session, project_id: str, run_vm_id: str, /, *, resource_name: str,
                        resource_type: str = "disk", status: str = RUN_VM_RESOURCE.initial,
                        **values: Any) -> BackupJobRunVmResource:
    """A resource (disk ``resource_name``: vda, sdb) of a VM of a run: ``bus``, ``disk_format``, ``size``,
    ``source_path``, ``backuptype``, ``tracking``, ``consistency``... as known.

    ``status``: ``queued`` for a disk recorded before its work; a disk recorded after the fact
    (the hypervisor reports a VM's disks when the group is done) starts in the status it reached.
    """
    _known(RUN_VM_RESOURCE, status)
    vm = get_one(session, BackupJobRunVm, project_id, run_vm_id, what="backupjobrun_vm")
    resource = BackupJobRunVmResource(project_id=project_id, backupjobrun_id=vm.backupjobrun_id,
                                      backupjobrun_vm_id=vm.id, resource_name=resource_name,
                                      resource_type=resource_type, status=status,
                                      **checked_values(values, _RESOURCE_FIELDS, "backupjobrun_vm_resource"))
    session.add(resource)
    session.flush()
    return resource


def add_vm_resource_backup(session: Session, project_id: str, resource_id: str, /, *,
                           vm_resource_backup_backing_id: str | None = None, top: bool = True,
                           status: str = VM_RESOURCE_BACKUP.initial, **values: Any) -> VmResourceBackup:
    """Record a resource's backup in the vault (status ``creating``): ``vault_service_id``,
    ``vault_service_url``, ``vault_service_metadata``, ``vault_backup_id``, bytes.

    ``vm_resource_backup_backing_id``: None for a full, the backing backup (of an earlier
    run, same project) for an incremental. A new ``top`` backup clears ``top`` on the
    resource's other backups. ``status``: ``creating`` before the data is stored, or the
    status it reached when recorded after the fact.
    """
    _known(VM_RESOURCE_BACKUP, status)
    resource = get_one(session, BackupJobRunVmResource, project_id, resource_id, what="backupjobrun_vm_resource")
    if vm_resource_backup_backing_id is not None:
        get_one(session, VmResourceBackup, project_id, vm_resource_backup_backing_id, what="vm_resource_backup")
    if top:
        session.execute(update(VmResourceBackup).where(VmResourceBackup.backupjobrun_vm_resource_id == resource.id,
                                                       *live(VmResourceBackup, project_id))
                        .values(top=False).execution_options(synchronize_session=False))
    backup = VmResourceBackup(project_id=project_id, backupjobrun_vm_resource_id=resource.id,
                              vm_resource_backup_backing_id=vm_resource_backup_backing_id, top=top,
                              status=status,
                              **checked_values(values, _BACKUP_FIELDS, "vm_resource_backup"))
    session.add(backup)
    session.flush()
    return backup


def _known(machine: StateMachine, status: str) -> None:
    if status not in machine.states:
        raise InvalidInput(f"{status!r} is not a status of a {machine.name}", code="STATUS_INVALID",
                           field="status")


def update_run_vm(session: Session, project_id: str, run_vm_id: str, /, **values: Any) -> BackupJobRunVm:
    return update_row(session, BackupJobRunVm, project_id, run_vm_id, values, allowed=_VM_FIELDS,
                      what="backupjobrun_vm")


def update_run_vm_resource(session: Session, project_id: str, resource_id: str,
                           /, **values: Any) -> BackupJobRunVmResource:
    return update_row(session, BackupJobRunVmResource, project_id, resource_id, values, allowed=_RESOURCE_FIELDS,
                      what="backupjobrun_vm_resource")


def update_vm_resource_backup(session: Session, project_id: str, backup_id: str, /, **values: Any) -> VmResourceBackup:
    return update_row(session, VmResourceBackup, project_id, backup_id, values, allowed=_BACKUP_FIELDS,
                      what="vm_resource_backup")


def transition_run_vm(session: Session, project_id: str, run_vm_id: str, new_status: str, /, *,
                      expected: str | Collection[str] | None = None, **values: Any) -> BackupJobRunVm:
    """Move a VM of a run (raksha.domain.states.RUN_VM); stamps ``started_at``/``finished_at``."""
    now = utcnow()
    if new_status == "snapshotting":
        values.setdefault("started_at", now)
    if RUN_VM.is_terminal(new_status):
        values.setdefault("finished_at", now)
    transition(session, BackupJobRunVm, RUN_VM, project_id, run_vm_id, new_status, expected=expected,
               values=values, allowed=_VM_FIELDS, what="backupjobrun_vm")
    return get_one(session, BackupJobRunVm, project_id, run_vm_id, what="backupjobrun_vm")


def transition_run_vm_resource(session: Session, project_id: str, resource_id: str, new_status: str, /, *,
                               expected: str | Collection[str] | None = None,
                               **values: Any) -> BackupJobRunVmResource:
    transition(session, BackupJobRunVmResource, RUN_VM_RESOURCE, project_id, resource_id, new_status,
               expected=expected, values=values, allowed=_RESOURCE_FIELDS, what="backupjobrun_vm_resource")
    return get_one(session, BackupJobRunVmResource, project_id, resource_id, what="backupjobrun_vm_resource")


def transition_vm_resource_backup(session: Session, project_id: str, backup_id: str, new_status: str, /, *,
                                  expected: str | Collection[str] | None = None, **values: Any) -> VmResourceBackup:
    """Move a backup (creating -> available | error -> deleting -> deleted); ``deleted`` soft-deletes the row."""
    own = {"deleted": True, "deleted_at": utcnow()} if new_status == "deleted" else {}
    transition(session, VmResourceBackup, VM_RESOURCE_BACKUP, project_id, backup_id, new_status,
               expected=expected, values=values, allowed=_BACKUP_FIELDS, what="vm_resource_backup",
               own_values=own)
    return session.execute(select(VmResourceBackup).where(VmResourceBackup.id == backup_id)
                           .execution_options(populate_existing=True)).scalar_one()


# ---------------------------------------------------------------- what deleting a run may delete

def _backups_of_run(project_id: str, run_id: str) -> Any:
    return (select(VmResourceBackup)
            .join(BackupJobRunVmResource,
                  VmResourceBackup.backupjobrun_vm_resource_id == BackupJobRunVmResource.id)
            .where(BackupJobRunVmResource.backupjobrun_id == run_id, VmResourceBackup.project_id == project_id,
                   VmResourceBackup.deleted.is_(False)))


def _referenced_elsewhere(run_id: str | None) -> Any:
    """EXISTS a live backup, of another run than ``run_id``, whose backing is the outer backup."""
    ref = aliased(VmResourceBackup)
    ref_resource = aliased(BackupJobRunVmResource)
    cond = [ref.vm_resource_backup_backing_id == VmResourceBackup.id, ref.deleted.is_(False)]
    if run_id is not None:
        cond.append(ref_resource.backupjobrun_id != run_id)
    return exists(select(ref.id).join(ref_resource, ref.backupjobrun_vm_resource_id == ref_resource.id)
                  .where(*cond))


def referenced_backup_ids(session: Session, project_id: str, run_id: str) -> set[str]:
    """Ids of the run's backups that a live backup of another run uses as its backing: keep these."""
    stmt = _backups_of_run(project_id, run_id).where(_referenced_elsewhere(run_id))
    return {b.id for b in session.execute(stmt).scalars()}


def deletable_backups(session: Session, project_id: str, run_id: str) -> list[VmResourceBackup]:
    """The run's live backups that no other run references: what deleting the run may remove from the vault."""
    stmt = _backups_of_run(project_id, run_id).where(~_referenced_elsewhere(run_id))
    return list(session.execute(stmt.order_by(VmResourceBackup.created_at)).scalars())


def orphaned_backups(session: Session, project_id: str) -> list[VmResourceBackup]:
    """Live backups of deleted runs that nothing references any more (kept earlier as a backing; now removable)."""
    stmt = (select(VmResourceBackup)
            .join(BackupJobRunVmResource,
                  VmResourceBackup.backupjobrun_vm_resource_id == BackupJobRunVmResource.id)
            .join(BackupJobRun, BackupJobRunVmResource.backupjobrun_id == BackupJobRun.id)
            .where(VmResourceBackup.project_id == project_id, VmResourceBackup.deleted.is_(False),
                   BackupJobRun.deleted.is_(True), ~_referenced_elsewhere(None))
            .order_by(VmResourceBackup.created_at))
    return list(session.execute(stmt).scalars())
