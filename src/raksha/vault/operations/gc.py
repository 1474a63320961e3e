"""Garbage collection: mark-and-sweep with a grace period, safe while backups run (format.md §11).

The invariant every step keeps: a chunk is deleted only if it was published in
this gc's condemned list and no backup references it after the wait; every
other chunk of a pack that goes away is first copied into a new pack and
indexed. Deletes happen only after what replaces them is durable, so a gc
killed at any point leaves a vault that reads correctly and that the next gc
finishes cleaning.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raksha.domain.errors import NotFound, RakshaError, VaultCorrupt, VaultFormatUnsupported, VaultLocked
from raksha.vault.engine.packer import MERGE_ENTRIES, Packer
from raksha.vault.format.index import IndexFile, Location, decode_index, index_key
from raksha.vault.format.pack import pack_key
from raksha.vault.locks import Lock, LockKind
from raksha.vault.processes import owner_alive
from raksha.vault.repository import CONDEMNED_SUFFIX, INDEX_PREFIX, LOCKS_PREFIX, Vault

KEEP, DELETE, REPACK, ORPHAN = "keep", "delete", "repack", "orphan"


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
    packs_missing: int = 0  # named by an index but not in the backend: damage, see 'raksha vault verify'
    indexes_consolidated: int = 0
    bytes_freed: int = 0
    waited_seconds: float = 0.0
    seconds: float = 0.0
    young_packs_kept: int = 0
    staging_files_removed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        verb = "would free" if self.dry_run else "freed"
        text = (f"gc: {self.backups} backups reference {self.live_chunks} chunks; of {self.packs_total} packs "
                f"{self.packs_deleted} deleted, {self.packs_repacked} repacked, {self.orphan_packs_deleted} orphans "
                f"deleted, {self.packs_reindexed} re-indexed, {self.young_packs_kept} kept as younger than the "
                f"grace period; {verb} {self.bytes_freed / 1e6:.1f} MB in {self.seconds:.1f} s")
        if self.packs_missing:
            text += f"\nwarning: {self.packs_missing} indexed pack(s) are missing; run 'raksha vault verify'"
        return text


@dataclass
class _Pack:
    id: str
    size: int
    mtime: float
    entries: dict[bytes, Location] = field(default_factory=dict)
    live_bytes: int = 0
    fate: str = KEEP  # keep | delete | repack | orphan
    reindexed: bool = False

    @property
    def blob_bytes(self) -> int:
        return sum(loc.stored_length for loc in self.entries.values())


def _writer_alive(path: Path) -> bool:
    """Whether the backup writing staged pack ``path`` (its pid is in the name) still runs."""
    try:
        pid = int(path.name.split("-")[1])
    except (IndexError, ValueError):
        return False  # not a name we wrote
    return owner_alive(pid, path.stat().st_mtime)


def live_chunks(vault: Vault) -> tuple[set[bytes], int]:
    """Every chunk id some backup references. Any unreadable manifest stops gc: its chunks would look free."""
    live: set[bytes] = set()
    ids = vault.backup_ids()
    for bid in ids:
        try:
            live.update(vault.read_manifest(bid).blob_ids())
        except NotFound:
            continue  # deleted meanwhile: its chunks are garbage now
        except RakshaError as err:
            raise VaultCorrupt(f"gc refuses to run: backup {bid} is unreadable ({err.message}); "
                               "run 'raksha vault verify'", backup=str(bid)) from None
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
        if not self.report.dry_run:
            self._drop_stale_condemned_lists()
            self._drop_stale_staging_files(t0 - self.grace)
        # 2. Mark. Manifests before indexes: a backup writes its index before its manifest, so every
        # chunk of a manifest read here is in an index read below (or in a pack younger than t0).
        live, self.report.backups = live_chunks(self.vault)
        self.report.live_chunks = len(live)
        files = self.vault.read_index_files()  # raises on a damaged index: its packs would look orphaned
        packs = self._classify(files, live, t0)
        # 3. Condemn.
        condemned = self._condemn(packs, live)
        if self.report.dry_run:
            self._account(packs, bytes_written=None)
            self.report.seconds = time.monotonic() - start
            return self.report
        condemned_key = f"{LOCKS_PREFIX}{self.lock.info.id}{CONDEMNED_SUFFIX}"
        self.vault.backend.put(condemned_key, b"".join(sorted(condemned)), overwrite=True)
        try:
            # 4. Wait, then re-mark: backups that finished meanwhile may use condemned chunks.
            self._wait_for_backups()
            now_live, _ = live_chunks(self.vault)
            condemned -= now_live
            self._adopt_new_indexes(packs, files)
            # 5. Sweep.
            self._sweep(packs, files, condemned)
        finally:
            self.vault.backend.delete(condemned_key)
        self.report.seconds = time.monotonic() - start
        return self.report

    # -- mark and condemn ----------------------------------------------------------------------

    def _classify(self, files: dict[str, IndexFile], live: set[bytes], t0: float) -> dict[str, _Pack]:
        packs = {pid: _Pack(pid, size, mtime) for pid, size, mtime in self.vault.iter_packs()}
        self.report.packs_total = len(packs)
        superseded = {s.hex() for f in files.values() for s in f.supersedes}
        missing: set[str] = set()
        for index_id, f in files.items():
            if index_id in superseded:
                continue
            for cid, loc in f.entries.items():
                pid = loc.pack_id.hex()
                p = packs.get(pid)
                if p is None and pid not in missing:
                    p = self._stat_pack(pid)  # not listed: an eventually consistent listing, or lost
                    if p is None:
                        missing.add(pid)
                    else:
                        packs[pid] = p
                if p is not None:
                    p.entries[cid] = loc
        self.report.packs_missing = len(missing)
        cutoff = t0 - self.grace
        young = {p.id for p in packs.values() if p.mtime >= cutoff}
        for p in packs.values():
            if not p.entries and p.id not in young:
                self._reindex_orphan(p, live)
        # Each live chunk is counted in one pack only; prefer packs we keep anyway (young, fullest).
        assigned: set[bytes] = set()
        order = sorted(packs.values(), key=lambda p: (p.id not in young, -sum(
            loc.stored_length for cid, loc in p.entries.items() if cid in live), p.id))
        for p in order:
            for cid, loc in p.entries.items():
                if cid in live and cid not in assigned:
                    assigned.add(cid)
                    p.live_bytes += loc.stored_length
        for p in packs.values():
            if p.id in young:
                self.report.young_packs_kept += 1
            elif p.fate == ORPHAN:
                pass
            elif p.live_bytes == 0:
                p.fate = DELETE
            elif 1 - p.live_bytes / max(1, p.blob_bytes) > self.threshold:
                # Garbage is measured over blob bytes: a pack's own header and preamble are not garbage,
                # or a small pack without any would be rewritten, identically, on every run.
                p.fate = REPACK
        return packs

    def _stat_pack(self, pid: str) -> _Pack | None:
        try:
            info = self.vault.backend.stat(pack_key(pid))
        except NotFound:
            return None
        return _Pack(pid, info.size, info.mtime)

    def _reindex_orphan(self, p: _Pack, live: set[bytes]) -> None:
        """A pack no index names: a killed backup's, or one whose index was lost. Keep it if it holds live data.

        Its entries go into the consolidated index (if it is kept), never into an index of its own: that
        one would outlive the pack if this gc (or the next) decided to delete it after all.
        """
        try:
            entries = self.vault.read_pack_header(p.id, p.size)
        except (NotFound, VaultCorrupt, VaultFormatUnsupported):
            # Unreadable and unindexed: nothing can use it. (A transient BackendError propagates:
            # a pack we merely failed to read may hold the only copy of live data.)
            p.fate = ORPHAN
            return
        pid = bytes.fromhex(p.id)
        locs = {e.chunk_id: Location(pid, e.offset, e.stored_length, e.raw_length) for e in entries}
        if any(cid in live for cid in locs):
            p.entries = locs
            p.reindexed = True
            self.report.packs_reindexed += 1
        else:
            p.fate = ORPHAN

    def _condemn(self, packs: dict[str, _Pack], live: set[bytes]) -> set[bytes]:
        """Chunks this gc will delete: in packs going away, in no pack staying, referenced by no backup."""
        kept = {cid for p in packs.values() if p.fate == KEEP for cid in p.entries}
        gone = {cid for p in packs.values() if p.fate in (DELETE, REPACK) for cid in p.entries}
        return gone - kept - live

    # -- wait ------------------------------------------------------------------------------------

    def _wait_for_backups(self) -> None:
        """Backups that started before the condemned list existed may reuse condemned chunks: wait them out."""
        waiting = {lk.id for lk in self.vault.locks.active() if lk.kind is LockKind.SHARED}
        if not waiting:
            return
        start = time.monotonic()
        while waiting:
            if time.monotonic() - start > self.max_wait:
                raise VaultLocked(f"gc gave up after waiting {self.max_wait:.0f} s for {len(waiting)} running "
                                  "backup(s); nothing was deleted, run gc again later")
            time.sleep(self.poll)
            waiting &= {lk.id for lk in self.vault.locks.active()}
        self.report.waited_seconds = time.monotonic() - start

    def _adopt_new_indexes(self, packs: dict[str, _Pack], files: dict[str, IndexFile]) -> None:
        """A pack named by an index written since the mark (a backup that was storing it then) stays."""
        for info in self.vault.backend.list(INDEX_PREFIX):
            index_id = info.key[len(INDEX_PREFIX):]
            if index_id in files:
                continue
            try:
                f = decode_index(self.vault.backend.get(info.key), self.vault.crypto, what=info.key)
            except NotFound:
                continue
            for loc in f.entries.values():
                p = packs.get(loc.pack_id.hex())
                if p is not None and p.fate != KEEP:
                    p.fate = KEEP

    # -- sweep -----------------------------------------------------------------------------------

    def _sweep(self, packs: dict[str, _Pack], files: dict[str, IndexFile], condemned: set[bytes]) -> None:
        backend = self.vault.backend
        # 1. Copy every chunk of a pack going away that is not condemned and not in a pack that stays:
        # blobs are sealed per chunk, so they are copied verbatim. Not only the chunks live now: a backup
        # that started after the condemned list was published may use any chunk that is not on it.
        kept_chunks = {cid for p in packs.values() if p.fate == KEEP for cid in p.entries}
        packer = Packer(self.vault)
        copied: set[bytes] = set()
        try:
            for p in sorted(packs.values(), key=lambda p: (p.fate != REPACK, p.id)):
                if p.fate not in (REPACK, DELETE):
                    continue
                for cid, loc in p.entries.items():
                    if cid not in condemned and cid not in kept_chunks and cid not in copied:
                        packer.add(cid, self.vault.read_blob(loc), loc.raw_length)
                        copied.add(cid)
                        p.fate = REPACK  # a DELETE pack holding a chunk that became live meanwhile
            packer.flush()
        except BaseException:
            packer.abort()
            raise
        new_entries: dict[bytes, Location] = {}
        for index_id in packer.indexes_written:  # small: one per new pack
            new_entries.update(decode_index(self.vault.backend.get(index_key(index_id)), self.vault.crypto,
                                            what=index_id).entries)
        # 2. One index of what stays, superseding every index read and those the repack wrote.
        entries = {cid: loc for p in packs.values() if p.fate == KEEP for cid, loc in p.entries.items()}
        entries.update(new_entries)
        old = list(dict.fromkeys([*files, *packer.indexes_written]))
        changed = (len(old) != 1 or self.report.packs_missing > 0
                   or any(p.fate != KEEP or p.reindexed for p in packs.values()))
        if changed and (old or entries):
            # In objects of at most MERGE_ENTRIES (a reader holds a whole object while decoding it); the
            # last one supersedes the old ones, so until it is durable they all count, and all hold.
            items = list(entries.items())
            pieces = [items[i : i + MERGE_ENTRIES] for i in range(0, len(items), MERGE_ENTRIES)] or [[]]
            for piece in pieces[:-1]:
                self.vault.write_index(dict(piece))
            self.vault.write_index(dict(pieces[-1]), [bytes.fromhex(i) for i in old])
            # 3. The new index is durable: the old ones can go. (Index objects carry a nonce, so no
            # later index can reuse one of these ids and be hidden by the supersedes list.)
            for index_id in old:
                backend.delete(index_key(index_id))
            self.report.indexes_consolidated = len(old)
        # 4. Only now, with every surviving chunk indexed elsewhere, delete packs.
        for p in packs.values():
            if p.fate in (DELETE, REPACK, ORPHAN):
                backend.delete(pack_key(p.id))
        self._account(packs, bytes_written=packer.bytes_written)

    def _account(self, packs: dict[str, _Pack], bytes_written: int | None) -> None:
        """Fill the report from the packs' fates; a dry run estimates what a repack would write."""
        r = self.report
        r.packs_deleted = sum(p.fate == DELETE for p in packs.values())
        r.packs_repacked = sum(p.fate == REPACK for p in packs.values())
        r.orphan_packs_deleted = sum(p.fate == ORPHAN for p in packs.values())
        removed = sum(p.size for p in packs.values() if p.fate in (DELETE, REPACK, ORPHAN))
        if bytes_written is None:
            bytes_written = sum(p.live_bytes for p in packs.values() if p.fate == REPACK)
        r.bytes_freed = max(0, removed - bytes_written)

    def _drop_stale_staging_files(self, cutoff: float) -> None:
        """Half-written packs of killed backups: older than the grace and their writer (named in the file) gone."""
        staging = self.vault.backend.staging_dir()
        for path in staging.glob("pack-*.partial"):
            try:
                if path.stat().st_mtime < cutoff and not _writer_alive(path):
                    path.unlink()
                    self.report.staging_files_removed += 1
            except FileNotFoundError:
                continue

    def _drop_stale_condemned_lists(self) -> None:
        """Remove ``.condemned`` objects a killed gc left behind: no backup reads them once their lock is gone."""
        live = {lk.id for lk in self.vault.locks.active()}
        for info in self.vault.backend.list(LOCKS_PREFIX):
            if info.key.endswith(CONDEMNED_SUFFIX) and \
                    info.key[len(LOCKS_PREFIX):-len(CONDEMNED_SUFFIX)] not in live:
                self.vault.backend.delete(info.key)
