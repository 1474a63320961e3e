"""Rebuild the index from the packs' own headers (format.md §13): disaster recovery when indexes are lost."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from raksha.domain.errors import RakshaError
from raksha.vault.engine.packer import MERGE_ENTRIES
from raksha.vault.format.chunk_table import IdSet
from raksha.vault.format.index import Location, index_rows
from raksha.vault.format.pack import pack_key
from raksha.vault.locks import LockKind
from raksha.vault.repository import Vault


@dataclass
class RebuildReport:
    packs_read: int = 0
    chunks_indexed: int = 0
    indexes_replaced: int = 0
    unreadable_packs: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        text = (f"rebuilt the index from {self.packs_read} packs: {self.chunks_indexed} chunks, replacing "
                f"{self.indexes_replaced} index objects, in {self.seconds:.1f} s")
        for bad in self.unreadable_packs:
            text += f"\n  unreadable pack {bad['object']}: {bad['error']}"
        return text


def rebuild_index(vault: Vault) -> RebuildReport:
    """Index every readable pack, superseding and then deleting all existing index objects.

    Written as the packs are read, in objects of at most MERGE_ENTRIES (format.md §7); the last one
    supersedes the old objects, so until it is durable they all still count."""
    report = RebuildReport()
    start = time.monotonic()
    with vault.locks.acquire(LockKind.EXCLUSIVE, "rebuild-index"):
        old = [info.key for info in vault.backend.list("index/")]
        written, rows, count, new = IdSet(), bytearray(), 0, []
        for pack_id, size, _mtime in vault.iter_packs():
            try:
                header = vault.read_pack_header(pack_id, size)
            except RakshaError as err:
                report.unreadable_packs.append({"object": pack_key(pack_id), "error": err.message})
                continue
            pid = bytes.fromhex(pack_id)
            for e in header:
                if e.chunk_id in written:
                    continue  # stored twice (two backups at once): any copy will do
                written.add(e.chunk_id)
                if count == MERGE_ENTRIES:
                    new.append(vault.write_index(rows))
                    rows, count = bytearray(), 0
                rows += index_rows([(e.chunk_id, Location(pid, e.offset, e.stored_length, e.raw_length))])
                count += 1
            report.packs_read += 1
        supersedes = []
        for key in old:
            try:
                supersedes.append(bytes.fromhex(key.rsplit("/", 1)[-1]))
            except ValueError:
                continue
        new.append(vault.write_index(rows, supersedes))
        for key in old:
            if key.rsplit("/", 1)[-1] not in new:
                vault.backend.delete(key)
        report.chunks_indexed = len(written)
        report.indexes_replaced = len(old)
    report.seconds = time.monotonic() - start
    return report
