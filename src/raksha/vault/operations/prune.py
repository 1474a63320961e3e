"""Delete backups by retention policy. Space is freed by gc afterwards, as in PBS."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from raksha.domain.errors import NotFound, RakshaError
from raksha.domain.retention import RetentionPolicy, Snapshot, apply
from raksha.vault.format.naming import BackupId
from raksha.vault.locks import LockKind
from raksha.vault.operations.catalog import list_backups
from raksha.vault.repository import Vault

UNDATED = "undated: neither its metadata nor its manifest could be read; run 'raksha vault verify'"


@dataclass
class PruneReport:
    dry_run: bool
    kept: list[tuple[str, list[str]]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "kept": [{"id": i, "reasons": r} for i, r in self.kept],
                "deleted": self.deleted}

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        lines = [f"keep   {i}  ({', '.join(r)})" for i, r in self.kept]
        lines += [f"{verb} {i}" for i in self.deleted]
        lines.append(f"{len(self.kept)} kept, {len(self.deleted)} {verb}"
                     + ("" if self.dry_run or not self.deleted else "; run 'raksha vault gc' to free space"))
        return "\n".join(lines)


def _created(text: object) -> datetime | None:
    """A stored ISO 8601 time as an aware UTC datetime; None if there is none to read."""
    if not isinstance(text, str) or not text:
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)  # the format writes UTC


def _backup_time(vault: Vault, bid: BackupId, row: dict[str, Any]) -> datetime | None:
    """When the backup was made: its metadata says; if that is unreadable, its manifest does."""
    created = None if "error" in row else _created(row.get("created"))
    if created is None:
        try:
            created = _created(vault.read_manifest(bid).created)
        except RakshaError:
            return None
    return created


def prune(vault: Vault, policy: RetentionPolicy, *, prefix: str = "", dry_run: bool = False) -> PruneReport:
    """Apply ``policy`` to each disk's series of backups (job/vm/disk) and delete the rest.

    A backup whose creation time cannot be read is kept (and said so): dated to the epoch, it would
    be the first to go.
    """
    apply(policy, [])  # refuses an empty policy (RETENTION_EMPTY) before anything is touched
    with vault.locks.acquire(LockKind.MAINTENANCE, "prune"):
        snaps: list[Snapshot] = []
        undated: list[str] = []
        for row in list_backups(vault, prefix):
            bid = BackupId.parse(row["id"])
            created = _backup_time(vault, bid, row)
            if created is None:
                undated.append(str(bid))
            else:
                snaps.append(Snapshot(str(bid), created, bid.series))
        result = apply(policy, snaps)
        report = PruneReport(dry_run, [(s.id, reasons) for s, reasons in result.keep])
        report.kept += [(i, [UNDATED]) for i in undated]
        for snap in result.forget:
            if not dry_run:
                try:
                    vault.delete_backup(BackupId.parse(snap.id))
                except NotFound:
                    pass  # deleted meanwhile ('raksha vault delete' takes only a shared lock)
            report.deleted.append(snap.id)
        return report
