"""Restores of runs: to new VMs, to files, in place."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from raksha.db.api._common import columns_of, get_one, live, page, transition, update_row
from raksha.db.api.runs import get_run
from raksha.db.models import Restore
from raksha.db.types import utcnow
from raksha.domain.errors import Conflict, InvalidInput
from raksha.domain.states import RESTORABLE_RUN_STATUSES, RESTORE, RestoreStatus, RestoreType

WHAT = "restore"
_UPDATABLE = columns_of(Restore) - {"backupjobrun_id", "restore_type"}


def create_restore(session: Session, project_id: str, user_id: str, run_id: str, *, restore_type: str = "new_vm",
                   selection: dict[str, Any] | None = None, target: dict[str, Any] | None = None,
                   name: str | None = None, description: str | None = None,
                   job_id: str | None = None) -> Restore:
    """A ``queued`` restore of the run; refused (``RUN_NOT_RESTORABLE``) unless the run is available or partial."""
    if restore_type not in tuple(RestoreType):
        raise InvalidInput(f"restore type must be one of {', '.join(RestoreType)}, not {restore_type!r}",
                           code="RESTORE_TYPE_INVALID", field="restore_type")
    run = get_run(session, project_id, run_id, job_id=job_id)
    if run.status not in RESTORABLE_RUN_STATUSES:
        raise Conflict(f"run {run.id} is {run.status}; only an available or partial run can be restored",
                       code="RUN_NOT_RESTORABLE", id=run.id, status=run.status)
    restore = Restore(project_id=project_id, user_id=user_id, backupjobrun_id=run.id, restore_type=restore_type,
                      selection=selection, target=target, name=name, description=description,
                      status=RESTORE.initial)
    session.add(restore)
    session.flush()
    return restore


def get_restore(session: Session, project_id: str, restore_id: str) -> Restore:
    return get_one(session, Restore, project_id, restore_id, what=WHAT)


def list_restores(session: Session, project_id: str, *, run_id: str | None = None, status: str | None = None,
                  restore_type: str | None = None, limit: int | None = None, marker: str | None = None,
                  offset: int | None = None, sort_dir: str = "desc") -> list[Restore]:
    stmt = select(Restore).where(*live(Restore, project_id))
    if run_id is not None:
        stmt = stmt.where(Restore.backupjobrun_id == run_id)
    if status is not None:
        stmt = stmt.where(Restore.status == status)
    if restore_type is not None:
        stmt = stmt.where(Restore.restore_type == restore_type)
    return page(session, Restore, stmt, limit=limit, marker=marker, offset=offset, sort_dir=sort_dir)


def update_restore(session: Session, project_id: str, restore_id: str, /, **values: Any) -> Restore:
    """Progress (``progress_percent``, ``bytes_done``, ``bytes_total``, ``eta_seconds``), ``results``, errors."""
    return update_row(session, Restore, project_id, restore_id, values, allowed=_UPDATABLE, what=WHAT)


def transition_restore(session: Session, project_id: str, restore_id: str, new_status: str, /, *,
                       expected: str | Collection[str] | None = None, **values: Any) -> Restore:
    """Move a restore (raksha.domain.states.RESTORE); stamps ``started_at`` and ``finished_at``."""
    now = utcnow()
    if new_status == RestoreStatus.RESTORING:
        values.setdefault("started_at", now)
    if RESTORE.is_terminal(new_status):
        values.setdefault("finished_at", now)
    transition(session, Restore, RESTORE, project_id, restore_id, new_status, expected=expected, values=values,
               allowed=_UPDATABLE, what=WHAT)
    return get_restore(session, project_id, restore_id)


def delete_restore(session: Session, project_id: str, restore_id: str) -> None:
    """Soft-delete a finished restore's record (what it produced is left alone)."""
    restore = get_restore(session, project_id, restore_id)
    if not RESTORE.is_terminal(restore.status):
        raise Conflict(f"restore {restore.id} is {restore.status}; cancel it first", code="RESTORE_BUSY",
                       id=restore.id, status=restore.status)
    now = utcnow()
    restore.deleted, restore.deleted_at, restore.updated_at = True, now, now
    session.flush()
