"""Delete backups by retention policy. Space is freed by gc afterwards, as in PBS."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from raksha.domain.retention import RetentionPolicy, Snapshot, apply
from raksha.vault.format.naming import BackupId
from raksha.vault.locks import LockKind
from raksha.vault.operations.catalog import list_backups
from raksha.vault.repository import Vault


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


def _created(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return datetime.fromtimestamp(0, UTC)


def prune(vault: Vault, policy: RetentionPolicy, *, prefix: str = "", dry_run: bool = False) -> PruneReport:
    """Apply ``policy`` to each disk's series of backups (job/vm/disk) and delete the rest."""
    with vault.locks.acquire(LockKind.MAINTENANCE, "prune"):
        snaps = []
        for row in list_backups(vault, prefix):
            bid = BackupId.parse(row["id"])
            snaps.append(Snapshot(str(bid), _created(row["created"]), bid.series))
        result = apply(policy, snaps)
        report = PruneReport(dry_run, [(s.id, reasons) for s, reasons in result.keep])
        for snap in result.forget:
            if not dry_run:
                vault.delete_backup(BackupId.parse(snap.id))
            report.deleted.append(snap.id)
        return report
