"""Vault services as the service sees them: the embedded default, and opening one for a run or restore."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from raksha.db import Database
from raksha.db import api as db
from raksha.db.models import VaultService
from raksha.domain.errors import InvalidInput, RakshaError
from raksha.vault.backends.local import LocalBackend
from raksha.vault.format.config import VaultConfig
from raksha.vault.format.keys import Secret
from raksha.vault.repository import Vault

DEFAULT_NAME = "local"
LOG = logging.getLogger(__name__)
T = TypeVar("T")


def find_default(session: Session) -> VaultService | None:
    """The default vault service: the shared (no project) local one named ``local``."""
    for row in db.list_vault_services(session, "", type="local", limit=1000):
        if row.project_id is None and row.name == DEFAULT_NAME:
            return row
    return None


def ensure_default(session: Session, path: str, *, encrypt: bool, key_file: str) -> VaultService:
    """The embedded default vault service (shared by every project), created with its vault on first start."""
    row = find_default(session)
    if row is not None:
        return row
    config: dict[str, Any] = {"encrypted": encrypt}
    if encrypt:
        config["key_file"] = key_file
    return db.create_vault_service(session, None, None, name=DEFAULT_NAME, type="local",
                                   url=Path(path).resolve().as_uri(), config=config,
                                   description="The embedded server's local vault")


def _secret(config: dict[str, Any], *, create: bool) -> Secret | None:
    key_file = config.get("key_file")
    if not config.get("encrypted"):
        return None
    if not key_file:
        raise InvalidInput("an encrypted vault service needs a key_file in its config", code="VAULT_KEY_REQUIRED")
    if create and not os.path.exists(key_file):
        os.makedirs(os.path.dirname(key_file) or ".", exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(64))
    with open(key_file, "rb") as f:
        return Secret(keyfile=f.read())


def local_path(row: VaultService) -> Path:
    if row.type != "local" or not row.url.startswith("file://"):
        raise InvalidInput(f"vault service {row.name} is {row.type} at {row.url}; this agent reaches local vaults only",
                           code="VAULT_TYPE_UNSUPPORTED")
    return Path(row.url[len("file://"):])


def open_vault(row: VaultService) -> Vault:
    """Open the service's vault, making it on first use (a new local directory, a new key file)."""
    path = local_path(row)
    backend = LocalBackend(path, create=True)
    fresh = not (path / "config").exists()
    secret = _secret(row.config or {}, create=fresh)
    if fresh:
        return Vault.init(backend, VaultConfig.new(encrypted=bool((row.config or {}).get("encrypted"))), secret)
    return Vault.open(backend, secret)


def on_local_vaults(database: Database, what: str, run: Callable[[Vault], T]) -> list[tuple[VaultService, T]]:
    """``run`` on the vault of every local vault service that has one (a vault never used is not made
    here), opened and closed around it; each service with what ``run`` returned. One that raises a
    RakshaError (another operation holds the vault, a key that does not open it...) is logged as ``what``
    skipped: the caller tries again next time."""
    with database.begin() as s:
        rows = db.all_vault_services(s)
    done: list[tuple[VaultService, T]] = []
    for row in rows:
        if row.type != "local":
            continue  # a remote vault is reached by the agent that reaches it
        try:
            if not (local_path(row) / "config").exists():
                continue  # never used yet: nothing to do (and nothing is made here)
            vault = open_vault(row)
            try:
                result = run(vault)
            finally:
                vault.close()
        except RakshaError as exc:
            LOG.warning("%s of vault service %s (%s) skipped: %s", what, row.name, row.id, exc)
            continue
        done.append((row, result))
    return done


def backup_url(row: VaultService, backup_id: str) -> str:
    """Where a disk's backup lives, in the seed's naming: ``<vault>/backupjobs/<job>/<run>/<vm>/<disk>``."""
    return f"{row.url.rstrip('/')}/backupjobs/{backup_id}"
