"""Garbage collection: mark-and-sweep with a grace period, safe while backups run (format.md §11)."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raksha.domain.errors import NotFound, RakshaError, VaultCorrupt, VaultLocked
from raksha.vault.engine.packer import Packer
from raksha.vault.format.constants import ZERO_ID
from raksha.vault.format.index import Location, index_key
from raksha.vault.format.pack import PACK_PREAMBLE, decode_header_bytes, pack_key
from raksha.vault.locks import Lock, LockKind
from raksha.vault.repository import CONDEMNED_SUFFIX, LOCKS_PREFIX, Vault


@dataclass
class GcReport:
    dry_run: bool
    backups: int = 0
    live_chunks: int = 0
    packs_total: int = 0
    packs_deleted: int = 0
    packs_repacked: int = 0
    orphan_packs_deleted: int = 0
    packs_reindexed: int = 0
    indexes_consolidated: int = 0
    bytes_freed: int = 0
    waited_seconds: float = 0.0
    seconds: float = 0.0
    young_packs_kept: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        verb = "would free" if self.dry_run else "freed"
        return (f"gc: {self.backups} backups reference {self.live_chunks} chunks; of {self.packs_total} packs "
                f"{self.packs_deleted} deleted, {self.packs_repacked} repacked, {self.orphan_packs_deleted} orphans "
                f"deleted, {self.young_packs_kept} kept as younger than the grace period; {verb} "
                f"{self.bytes_freed / 1e6:.1f} MB in {self.seconds:.1f} s")


@dataclass
class _Pack:
    id: str
    size: int
    mtime: float
    entries: list[tuple[bytes, Location]] = field(default_factory=list)
    live_bytes: int = 0
    fate: str = "keep"  # keep | delete | repack | orphan


def live_chunks(vault: Vault) -> tuple[set[bytes], int]:
    """Every chunk id some backup references. Any unreadable manifest stops gc: its chunks would look free."""
    live: set[bytes] = set()
    ids = vault.backup_ids()
    for bid in ids:
        try:
            live.update(vault.read_manifest(bid).chunk_ids)
        except NotFound:
            continue  # deleted meanwhile: its chunks are garbage now
        except RakshaError as err:
            raise VaultCorrupt(f"gc refuses to run: backup {bid} is unreadable ({err.message}); "
                               "run 'raksha vault verify'", backup=str(bid)) from None
    live.discard(ZERO_ID)
    return live, len(ids)


def collect_garbage(vault: Vault, *, grace: float = 3600.0, max_wait: float = 600.0,
                    repack_threshold: float = 0.25, dry_run: bool = False, poll: float = 1.0,
                    clock: Callable[[], float] = time.time) -> GcReport:
    with vault.locks.acquire(LockKind.MAINTENANCE, "gc") as lock:
        return _Gc(vault, grace, max_wait, repack_threshold, dry_run, poll, clock, lock).run()


class _Gc:
    def __init__(self, vault: Vault, grace: float, max_wait: float, threshold: float, dry_run: bool,
                 poll: float, clock: Callable[[], float], lock: Lock) -> None:
        self.vault = vault
        self.grace = grace
        self.max_wait = max_wait
        self.threshold = threshold
        self.poll = poll
        self.clock = clock
        self.lock = lock
        self.report = GcReport(dry_run)

    def run(self) -> GcReport:
        start = time.monotonic()
        t0 = self.clock()
        live, self.report.backups = live_chunks(self.vault)
        self.report.live_chunks = len(live)
        files = self.vault.read_index_files()  # raises on a damaged index: its packs would look orphaned
        packs = self._classify(files, live, t0)
        condemned = self._condemned(packs, live)
        if self.report.dry_run:
            self.report.seconds = time.monotonic() - start
            return self.report
        condemned_key = f"{LOCKS_PREFIX}{self.lock.info.id}{CONDEMNED_SUFFIX}"
        self.vault.backend.put(condemned_key, b"".join(sorted(condemned)), overwrite=True)
        try:
            self._wait_for_backups()
            live, _ = live_chunks(self.vault)  # backups that finished meanwhile may use condemned chunks
            self._rescue(packs, live)
            self._sweep(packs, files, live)
        finally:
            self.vault.backend.delete(condemned_key)
        self.report.seconds = time.monotonic() - start
        return self.report

    def _classify(self, files: dict[str, Any], live: set[bytes], t0: float) -> dict[str, _Pack]:
        packs = {pid: _Pack(pid, size, mtime) for pid, size, mtime in self.vault.iter_packs()}
        self.report.packs_total = len(packs)
        superseded = {s.hex() for f in files.values() for s in f.supersedes}
        for index_id, f in files.items():
            if index_id in superseded:
                continue
            for cid, loc in f.entries.items():
                p = packs.get(loc.pack_id.hex())
                if p is not None:
                    p.entries.append((cid, loc))
        for p in packs.values():
            if not p.entries and p.mtime < t0 - self.grace:
                self._reindex_orphan(p, live)
        # Each live chunk is counted in one pack only; prefer packs we keep anyway (young, fullest).
        young = {p.id for p in packs.values() if p.mtime >= t0 - self.grace}
        assigned: set[bytes] = set()
        order = sorted(packs.values(), key=lambda p: (p.id not in young, -sum(
            loc.stored_length for cid, loc in p.entries if cid in live)))
        for p in order:
            for cid, loc in p.entries:
                if cid in live and cid not in assigned:
                    assigned.add(cid)
                    p.live_bytes += loc.stored_length
        for p in packs.values():
            if p.id in young:
                self.report.young_packs_kept += 1
            elif p.fate == "orphan":
                pass
            elif p.live_bytes == 0:
                p.fate = "delete"
            elif 1 - p.live_bytes / max(1, p.size) > self.threshold:
                p.fate = "repack"
        return packs

    def _reindex_orphan(self, p: _Pack, live: set[bytes]) -> None:
        """A pack no index names: a killed backup's, or one whose index was lost. Keep it if it holds live data."""
        key = pack_key(p.id)
        try:
            tail = self.vault.backend.get_range(key, p.size - 4, 4)
            (hlen,) = struct.unpack("<I", tail)
            blob_end = p.size - 4 - hlen
            if blob_end < len(PACK_PREAMBLE):
                raise VaultCorrupt(f"{key}: bad header length")
            header = self.vault.backend.get_range(key, blob_end, hlen)
            entries = decode_header_bytes(header, blob_end, self.vault.crypto, what=key)
        except (RakshaError, struct.error):
            p.fate = "orphan"  # unreadable and unindexed: nothing can use it
            return
        pid = bytes.fromhex(p.id)
        locs = {e.chunk_id: Location(pid, e.offset, e.stored_length, e.raw_length) for e in entries}
        if any(cid in live for cid in locs):
            if not self.report.dry_run:
                self.vault.write_index(locs)
            p.entries = list(locs.items())
            self.report.packs_reindexed += 1
        else:
            p.fate = "orphan"

    def _condemned(self, packs: dict[str, _Pack], live: set[bytes]) -> set[bytes]:
        kept = {cid for p in packs.values() if p.fate == "keep" for cid, _ in p.entries}
        gone = {cid for p in packs.values() if p.fate in ("delete", "repack") for cid, _ in p.entries}
        for p in packs.values():
            if p.fate == "delete":
                self.report.packs_deleted += 1
                self.report.bytes_freed += p.size
            elif p.fate == "repack":
                self.report.packs_repacked += 1
                self.report.bytes_freed += p.size - p.live_bytes
            elif p.fate == "orphan":
                self.report.orphan_packs_deleted += 1
                self.report.bytes_freed += p.size
        return {cid for cid in gone - kept if cid not in live}

    def _wait_for_backups(self) -> None:
        """Backups that started before the condemned list existed may reuse condemned chunks: wait them out."""
        waiting = {lk.id for lk in self.vault.locks.active() if lk.kind is LockKind.SHARED}
        start = time.monotonic()
        while waiting:
            if time.monotonic() - start > self.max_wait:
                raise VaultLocked(f"gc gave up after waiting {self.max_wait:.0f} s for {len(waiting)} running "
                                  "backup(s); nothing was deleted, run gc again later")
            time.sleep(self.poll)
            waiting &= {lk.id for lk in self.vault.locks.active()}
        self.report.waited_seconds = time.monotonic() - start

    def _rescue(self, packs: dict[str, _Pack], live: set[bytes]) -> None:
        """Chunks that became live while gc waited: their packs are repacked instead of deleted."""
        for p in packs.values():
            if p.fate == "delete" and any(cid in live for cid, _ in p.entries):
                p.fate = "repack"

    def _sweep(self, packs: dict[str, _Pack], files: dict[str, Any], live: set[bytes]) -> None:
        backend = self.vault.backend
        # 1. Repack: copy live blobs verbatim (they are sealed per chunk) into new packs with their own index.
        packer = Packer(self.vault)
        copied: set[bytes] = set()
        kept_chunks = {cid for p in packs.values() if p.fate == "keep" for cid, _ in p.entries}
        for p in packs.values():
            if p.fate != "repack":
                continue
            for cid, loc in p.entries:
                if cid in live and cid not in kept_chunks and cid not in copied:
                    packer.add(cid, self.vault.read_blob(loc), loc.raw_length)
                    copied.add(cid)
        packer.flush()
        # 2. One index of what stays, superseding every index read; then drop the old ones.
        keep_entries = {cid: loc for p in packs.values() if p.fate == "keep" for cid, loc in p.entries}
        supersedes = [bytes.fromhex(i) for i in files]
        if supersedes:
            self.vault.write_index(keep_entries, supersedes)
            for index_id in files:
                backend.delete(index_key(index_id))
            self.report.indexes_consolidated = len(files)
        # 3. Only now, with every live chunk indexed elsewhere, delete packs.
        for p in packs.values():
            if p.fate in ("delete", "repack", "orphan"):
                backend.delete(pack_key(p.id))
