"""Vault services: where backups are stored. A project sees its own and the shared ones (project_id NULL)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from raksha.db.api._common import columns_of, get_one, page, update_row
from raksha.db.models import BackupJob, VaultService
from raksha.db.types import utcnow
from raksha.domain.errors import Conflict, InvalidInput, NotFound

VAULT_TYPES = ("local", "swift", "s3")
_UPDATABLE = columns_of(VaultService)
WHAT = "vault service"


def _check_type(vault_type: str) -> None:
    if vault_type not in VAULT_TYPES:
        raise InvalidInput(f"vault type must be one of {', '.join(VAULT_TYPES)}, not {vault_type!r}",
                           code="VAULT_TYPE_INVALID", field="type")


def create_vault_service(session: Session, project_id: str | None, user_id: str | None, *, name: str, type: str,
                         url: str, config: dict[str, Any] | None = None,
                         description: str | None = None) -> VaultService:
    """A vault service of ``project_id``; ``project_id=None`` makes one every project may use (operators only)."""
    _check_type(type)
    vault = VaultService(project_id=project_id, user_id=user_id, name=name, type=type, url=url,
                         config=config or {}, description=description)
    session.add(vault)
    session.flush()
    return vault


def get_vault_service(session: Session, project_id: str, vault_service_id: str) -> VaultService:
    """The project's own vault service or a shared one."""
    stmt = select(VaultService).where(VaultService.id == vault_service_id, VaultService.deleted.is_(False),
                                      or_(VaultService.project_id == project_id, VaultService.project_id.is_(None)))
    vault = session.execute(stmt).scalar_one_or_none()
    if vault is None:
        raise NotFound(f"no vault service {vault_service_id!r}", code="VAULT_SERVICE_NOT_FOUND", id=vault_service_id)
    return vault


def list_vault_services(session: Session, project_id: str, *, type: str | None = None, limit: int | None = None,
                        marker: str | None = None, offset: int | None = None,
                        sort_dir: str = "desc") -> list[VaultService]:
    stmt = select(VaultService).where(VaultService.deleted.is_(False),
                                      or_(VaultService.project_id == project_id, VaultService.project_id.is_(None)))
    if type is not None:
        stmt = stmt.where(VaultService.type == type)
    return page(session, VaultService, stmt, limit=limit, marker=marker, offset=offset, sort_dir=sort_dir)


def update_vault_service(session: Session, project_id: str | None, vault_service_id: str,
                         /, **values: Any) -> VaultService:
    """Change the project's own vault service (``project_id=None``: a shared one, operators only)."""
    if "type" in values:
        _check_type(values["type"])
    return update_row(session, VaultService, project_id, vault_service_id, values, allowed=_UPDATABLE, what=WHAT)


def delete_vault_service(session: Session, project_id: str | None, vault_service_id: str) -> None:
    """Soft-delete a vault service no live job uses (else ``VAULT_SERVICE_IN_USE``)."""
    vault = get_one(session, VaultService, project_id, vault_service_id, what=WHAT)
    users = session.execute(select(BackupJob.id).where(BackupJob.vault_service_id == vault.id,
                                                       BackupJob.deleted.is_(False)).limit(5)).scalars().all()
    if users:
        raise Conflict(f"vault service {vault.id} is used by backup job(s) {', '.join(users)}",
                       code="VAULT_SERVICE_IN_USE", id=vault.id)
    now = utcnow()
    vault.deleted, vault.deleted_at, vault.updated_at = True, now, now
    session.flush()
