"""Backup ids and the seed's object naming (format.md §2)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from raksha.domain.errors import InvalidInput

_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PREFIX = "backupjobs/"
BACKUP = "Backup"
METADATA = "BackupMetadata"


@dataclass(frozen=True, order=True)
class BackupId:
    """``<job>/<run>/<vm>/<resource>``: the seed's backupjob, backupjobrun, VM and vmresource."""

    job: str
    run: str
    vm: str
    resource: str

    @classmethod
    def parse(cls, text: str) -> BackupId:
        parts = text.strip("/").split("/")
        if len(parts) != 4 or not all(_COMPONENT.match(p) for p in parts):
            raise InvalidInput(
                f"invalid backup id {text!r}: expected JOB/RUN/VM/DISK, each 1-128 of [A-Za-z0-9._-] "
                "starting with a letter or digit",
                code="INVALID_BACKUP_ID",
            )
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.job}/{self.run}/{self.vm}/{self.resource}"

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{self}/"

    @property
    def backup_key(self) -> str:
        return self.prefix + BACKUP

    @property
    def metadata_key(self) -> str:
        return self.prefix + METADATA

    @property
    def series(self) -> str:
        """Backups of one disk over time: the group retention applies to."""
        return f"{self.job}/{self.vm}/{self.resource}"

    @classmethod
    def from_backup_key(cls, key: str) -> BackupId | None:
        """The id of a ``.../Backup`` key, or None for any other key."""
        if not key.startswith(PREFIX) or not key.endswith("/" + BACKUP):
            return None
        try:
            return cls.parse(key[len(PREFIX) : -len(BACKUP) - 1])
        except InvalidInput:
            return None
