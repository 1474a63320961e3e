"""Queries across every project, for the scheduler and for recovery after a restart. Never for the API."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from raksha.db.models import BackupJob, BackupJobRun, BackupJobRunVmResource, Restore, VaultService, VmResourceBackup
from raksha.domain.states import RESTORE, RUN, JobStatus, RunStatus, VerifyState
from raksha.domain.verify_coverage import Coverage, VerifyPass, coverage, newest_first


def due_jobs(session: Session, now: datetime, *, limit: int = 100) -> list[BackupJob]:
    """Scheduled jobs whose ``next_run_at`` has come and that have no run in progress, most overdue first."""
    stmt = (select(BackupJob)
            .where(BackupJob.deleted.is_(False), BackupJob.status == JobStatus.AVAILABLE,
                   BackupJob.schedule_enabled.is_(True), BackupJob.next_run_at.is_not(None),
                   BackupJob.next_run_at <= now, BackupJob.active_run_id.is_(None))
            .order_by(BackupJob.next_run_at, BackupJob.id).limit(limit))
    return list(session.execute(stmt).scalars())


def unfinished_runs(session: Session) -> list[BackupJobRun]:
    """Runs of every project that are not terminal: after a restart, the ones to resume or fail."""
    stmt = (select(BackupJobRun).where(BackupJobRun.deleted.is_(False), BackupJobRun.status.in_(RUN.active))
            .order_by(BackupJobRun.created_at, BackupJobRun.id))
    return list(session.execute(stmt).scalars())


def unfinished_restores(session: Session) -> list[Restore]:
    stmt = (select(Restore).where(Restore.deleted.is_(False), Restore.status.in_(RESTORE.active))
            .order_by(Restore.created_at, Restore.id))
    return list(session.execute(stmt).scalars())


def all_vault_services(session: Session) -> list[VaultService]:
    """Every live vault service, shared or a project's: the vaults whose garbage the scheduler collects."""
    stmt = select(VaultService).where(VaultService.deleted.is_(False)).order_by(VaultService.created_at,
                                                                                VaultService.id)
    return list(session.execute(stmt).scalars())


def _run_of_backups(session: Session, vault_service_id: str, backup_ids: Collection[str]) -> dict[str, str]:
    """The run of each of ``backup_ids`` (``job/run/vm/disk`` in the vault) stored in the vault service."""
    if not backup_ids:
        return {}
    stmt = (select(VmResourceBackup.vault_backup_id, BackupJobRunVmResource.backupjobrun_id)
            .join(BackupJobRunVmResource, VmResourceBackup.backupjobrun_vm_resource_id == BackupJobRunVmResource.id)
            .where(VmResourceBackup.vault_service_id == vault_service_id,
                   VmResourceBackup.vault_backup_id.in_(list(backup_ids))))
    return {str(bid): run_id for bid, run_id in session.execute(stmt)}


def record_verification(session: Session, vault_service_id: str, new: VerifyPass) -> Coverage | None:
    """Keep ``new`` among the vault service's recent passes and say what it means for the runs stored there:
    a run one of whose backups it named is ``damaged``; once the recent passes have read every pack, each
    run finished before they began and named by none of them is ``ok`` (verified now). Returns that
    coverage, if the passes reached one."""
    vault = session.execute(select(VaultService).where(VaultService.id == vault_service_id)
                            .with_for_update()).scalar_one()
    passes = newest_first(new, vault.verifications)
    vault.verifications = [p.to_dict() for p in passes]
    now = new.finished_at
    notes: dict[str, list[str]] = {}
    for bid, run_id in _run_of_backups(session, vault_service_id, new.damaged_backups).items():
        vm_disk = "/".join(bid.split("/")[2:])
        notes.setdefault(run_id, []).append(f"{vm_disk}: {new.damaged_backups[bid]}")
    for run_id, lines in notes.items():
        session.execute(update(BackupJobRun).where(BackupJobRun.id == run_id).values(
            verify_state=VerifyState.DAMAGED, verified_at=now, verify_note="\n".join(sorted(lines))[:4000]))
    cov = coverage(passes)
    if cov is not None:
        stored_here = (select(BackupJobRunVmResource.backupjobrun_id)
                       .join(VmResourceBackup,
                             VmResourceBackup.backupjobrun_vm_resource_id == BackupJobRunVmResource.id)
                       .where(VmResourceBackup.vault_service_id == vault_service_id))
        damaged = set(_run_of_backups(session, vault_service_id, cov.damaged_backups).values())
        session.execute(update(BackupJobRun).where(
            BackupJobRun.id.in_(stored_here), BackupJobRun.id.not_in(damaged), BackupJobRun.deleted.is_(False),
            BackupJobRun.status.in_((RunStatus.AVAILABLE, RunStatus.PARTIAL)),
            BackupJobRun.finished_at < cov.since,
        ).values(verify_state=VerifyState.OK, verified_at=now, verify_note=None)
            .execution_options(synchronize_session=False))
    session.flush()
    return cov
