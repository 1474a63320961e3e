"""Backup jobs and their VMs."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session, selectinload

from raksha.db.api._common import columns_of, get_one, live, page, update_row
from raksha.db.api.vaults import get_vault_service
from raksha.db.models import BackupJob, BackupJobVm
from raksha.db.types import utcnow
from raksha.domain.errors import InvalidInput, JobBusy
from raksha.domain.states import JOB, Consistency, JobStatus

WHAT = "backupjob"
_LOAD = (selectinload(BackupJob.vms), selectinload(BackupJob.vault_service))
_UPDATABLE = columns_of(BackupJob) - {"active_run_id", "runs_started"}

#: A VM of a job: its id (libvirt domain name or UUID, Nova instance id), or ``(id, display name)``.
VmSpec = str | tuple[str, str | None]


def _vm_rows(project_id: str, job_id: str, vms: Sequence[VmSpec]) -> list[BackupJobVm]:
    if not vms:
        raise InvalidInput("a backup job needs at least one VM", code="BACKUPJOB_NO_VMS", field="vms")
    rows, seen = [], set()
    for spec in vms:
        vm_id, vm_name = (spec, None) if isinstance(spec, str) else spec
        if not vm_id or vm_id in seen:
            raise InvalidInput(f"VM {vm_id!r} is empty or listed twice", code="BACKUPJOB_VMS_INVALID", field="vms")
        seen.add(vm_id)
        rows.append(BackupJobVm(project_id=project_id, backupjob_id=job_id, vm_id=vm_id, vm_name=vm_name))
    return rows


def _check_consistency(level: str | None) -> None:
    if level is not None and level not in tuple(Consistency):
        raise InvalidInput(f"consistency must be one of {', '.join(Consistency)} or none, not {level!r}",
                           code="INVALID_CONSISTENCY", field="consistency")


def create_job(session: Session, project_id: str, user_id: str, *, name: str, vms: Sequence[VmSpec],
               description: str | None = None, vault_service_id: str | None = None,
               schedule_interval_seconds: int | None = None, schedule_cron: str | None = None,
               schedule_enabled: bool = True, full_every: int = 0, next_run_at: datetime | None = None,
               retention: dict[str, Any] | None = None, excluded_disks: dict[str, Any] | None = None,
               consistency: str | None = None) -> BackupJob:
    """A new job of ``vms``, status ``available``, returned with its VMs and vault service loaded.

    ``consistency``: the level wanted (crash, filesystem, application); None: the best each VM reaches."""
    _check_consistency(consistency)
    if vault_service_id is not None:
        get_vault_service(session, project_id, vault_service_id)
    job = BackupJob(project_id=project_id, user_id=user_id, name=name, description=description,
                    status=JOB.initial, vault_service_id=vault_service_id,
                    schedule_interval_seconds=schedule_interval_seconds, schedule_cron=schedule_cron,
                    schedule_enabled=schedule_enabled, full_every=full_every, next_run_at=next_run_at,
                    retention=retention, excluded_disks=excluded_disks, consistency=consistency)
    session.add(job)
    session.flush()
    session.add_all(_vm_rows(project_id, job.id, vms))
    session.flush()
    return get_job(session, project_id, job.id)


def get_job(session: Session, project_id: str, job_id: str) -> BackupJob:
    """The job with its VMs and vault service; ``BACKUPJOB_NOT_FOUND`` if absent, deleted or another tenant's."""
    return get_one(session, BackupJob, project_id, job_id, options=_LOAD, what=WHAT)


def list_jobs(session: Session, project_id: str, *, status: str | None = None, name: str | None = None,
              limit: int | None = None, marker: str | None = None, offset: int | None = None,
              sort_dir: str = "desc") -> list[BackupJob]:
    """The project's jobs, newest first by default, with their VMs loaded."""
    stmt = select(BackupJob).where(*live(BackupJob, project_id)).options(*_LOAD)
    if status is not None:
        stmt = stmt.where(BackupJob.status == status)
    if name is not None:
        stmt = stmt.where(BackupJob.name == name)
    return page(session, BackupJob, stmt, limit=limit, marker=marker, offset=offset, sort_dir=sort_dir)


def update_job(session: Session, project_id: str, job_id: str, /, *, vms: Sequence[VmSpec] | None = None,
               **values: Any) -> BackupJob:
    """Change a job's fields; ``vms`` replaces its VM list (the old rows are soft-deleted)."""
    if values.get("vault_service_id") is not None:
        get_vault_service(session, project_id, values["vault_service_id"])
    if "consistency" in values:
        _check_consistency(values["consistency"])
    job = update_row(session, BackupJob, project_id, job_id, values, allowed=_UPDATABLE, what=WHAT)
    if vms is not None:
        rows = _vm_rows(project_id, job.id, vms)
        now = utcnow()
        session.execute(update(BackupJobVm).where(BackupJobVm.backupjob_id == job.id, *live(BackupJobVm, project_id))
                        .values(deleted=True, deleted_at=now, updated_at=now)
                        .execution_options(synchronize_session=False))
        session.add_all(rows)
        job.updated_at = now
        session.flush()
    return get_job(session, project_id, job_id)


def delete_job(session: Session, project_id: str, job_id: str) -> None:
    """Soft-delete a job and its VM list. Refused (``JOB_BUSY``) while a run of it is in progress.

    Its runs are left as they are: deleting them (and their vault data) is the caller's choice.
    """
    job = get_job(session, project_id, job_id)
    if job.active_run_id is not None:
        raise JobBusy(f"backup job {job.id} has run {job.active_run_id} in progress",
                      id=job.id, run_id=job.active_run_id)
    JOB.check(job.status, JobStatus.DELETED, resource_id=job.id)
    now = utcnow()
    # compare-and-set on the lock, so a run that starts now cannot slip in under a deleted job
    result = session.execute(update(BackupJob).where(BackupJob.id == job.id, BackupJob.active_run_id.is_(None),
                                                     *live(BackupJob, project_id))
                             .values(status=JobStatus.DELETED, deleted=True, deleted_at=now, updated_at=now)
                             .execution_options(synchronize_session=False))
    if cast(CursorResult[Any], result).rowcount != 1:
        raise JobBusy(f"backup job {job.id} started a run while being deleted", id=job.id)
    session.execute(update(BackupJobVm).where(BackupJobVm.backupjob_id == job.id, *live(BackupJobVm, project_id))
                    .values(deleted=True, deleted_at=now, updated_at=now)
                    .execution_options(synchronize_session=False))
