"""The catalogue of backups, read from the vault alone (format.md §13)."""

from __future__ import annotations

from typing import Any

from raksha.domain.errors import RakshaError
from raksha.vault.repository import Vault


def list_backups(vault: Vault, prefix: str = "") -> list[dict[str, Any]]:
    """Every backup with what its metadata says; unreadable metadata is reported, not fatal."""
    out = []
    for bid in vault.backup_ids(prefix):
        row: dict[str, Any] = {"id": str(bid), "job": bid.job, "run": bid.run, "vm": bid.vm, "disk": bid.resource}
        try:
            meta = vault.read_metadata(bid)
            row.update(kind=meta.get("kind", "?"), created=meta.get("created", ""), parent=meta.get("parent"),
                       virtual_size=int(meta.get("source", {}).get("virtual_size", 0)),
                       bytes_stored=int(meta.get("stats", {}).get("bytes_stored", 0)),
                       content_digest=meta.get("checksums", {}).get("content_digest"))
        except RakshaError as err:
            row.update(kind="?", created="", parent=None, virtual_size=0, error=err.to_dict())
        except (ValueError, TypeError, AttributeError) as exc:  # decodes, but members of the wrong type
            row.update(kind="?", created="", parent=None, virtual_size=0,
                       error={"code": "VAULT_CORRUPT", "message": f"{bid}: malformed metadata: {exc}",
                              "retryable": False})
        out.append(row)
    return out
