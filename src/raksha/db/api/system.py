"""Queries across every project, for the scheduler and for recovery after a restart. Never for the API."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from raksha.db.models import BackupJob, BackupJobRun, Restore, VaultService
from raksha.domain.states import RESTORE, RUN, JobStatus


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
