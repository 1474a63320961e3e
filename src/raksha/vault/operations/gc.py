"""Garbage collection: mark-and-sweep with a grace period, safe while backups run (format.md §11).

The invariant every step keeps: a chunk is deleted only if it was published in
this gc's condemned list and no backup references it after the wait; every
other chunk of a pack that goes away is first copied into a new pack and
indexed. Deletes happen only after what replaces them is durable, so a gc
killed at any point leaves a vault that reads correctly and that the next gc
finishes cleaning.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raksha.domain.errors import NotFound, RakshaError, VaultCorrupt, VaultFormatUnsupported, VaultLocked
from raksha.vault.engine.packer import MERGE_ENTRIES, Packer
from raksha.vault.format.chunk_table import IdSet
from raksha.vault.format.index import Location, decode_index, index_key, index_rows
from raksha.vault.format.naming import BackupId
from raksha.vault.format.pack import pack_key
from raksha.vault.locks import Lock, LockKind
from raksha.vault.processes import owner_alive
from raksha.vault.repository import CONDEMNED_SUFFIX, INDEX_PREFIX, LOCKS_PREFIX, IndexScan, Vault

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


_ENTRY = struct.Struct("<32sIII")  # chunk id, offset, stored length, raw length


class _Entries(Mapping[bytes, Location]):
    """A pack's chunks as its index lists them, 44 bytes each in one buffer: a dict of Locations cost
    ~385 bytes a chunk, and gc holds every pack's (a vault of a million chunks: 500 MB)."""

    __slots__ = ("_pack_id", "_rows")

    def __init__(self, pack_id: bytes) -> None:
        self._pack_id = pack_id
        self._rows = bytearray()

    def add(self, cid: bytes, offset: int, stored_length: int, raw_length: int) -> None:
        """An entry; one listed twice is dropped by ``drop_repeats``, once all are in."""
        self._rows += _ENTRY.pack(cid, offset, stored_length, raw_length)

    def drop_repeats(self) -> None:
        """Keep each chunk once (two index objects can name the same entry). Once per pack, a set of its
        ids at a time: searching the rows at each add was quadratic (8,192 small blobs a pack: 16 s for
        66 packs)."""
        ids = [cid for cid, _offset, _stored, _raw in _ENTRY.iter_unpack(self._rows)]
        if len(set(ids)) == len(ids):
            return
        seen: set[bytes] = set()
        rows = bytearray()
        for k, cid in enumerate(ids):
            if cid not in seen:
                seen.add(cid)
                rows += self._rows[k * _ENTRY.size : (k + 1) * _ENTRY.size]
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows) // _ENTRY.size

    def __iter__(self) -> Iterator[bytes]:
        for cid, _offset, _stored, _raw in _ENTRY.iter_unpack(self._rows):
            yield cid

    def __getitem__(self, cid: bytes) -> Location:
        for c, loc in self.items():
            if c == cid:
                return loc
        raise KeyError(cid)

    def items(self) -> Iterator[tuple[bytes, Location]]:  # type: ignore[override]
        for cid, offset, stored, raw in _ENTRY.iter_unpack(self._rows):
            yield cid, Location(self._pack_id, offset, stored, raw)

    def stored_lengths(self) -> Iterator[tuple[bytes, int]]:
        for cid, _offset, stored, _raw in _ENTRY.iter_unpack(self._rows):
            yield cid, stored


@dataclass
class _Pack:
    id: str
    size: int
    mtime: float
    entries: _Entries = field(init=False)
    live_bytes: int = 0
    fate: str = KEEP  # keep | delete | repack | orphan
    reindexed: bool = False

    def __post_init__(self) -> None:
        self.entries = _Entries(bytes.fromhex(self.id))

    @property
    def blob_bytes(self) -> int:
        return sum(stored for _cid, stored in self.entries.stored_lengths())


def _only_in_going(packs: dict[str, _Pack], skip: Container[bytes]) -> IdSet:
    """The chunks of packs going away that are not in ``skip`` and that no pack staying holds. What
    is looked up in the staying packs is sized by the candidates, not by every chunk those hold."""
    candidates = IdSet(cid for p in packs.values() if p.fate in (DELETE, REPACK)
                       for cid in p.entries if cid not in skip)
    kept = {cid for p in packs.values() if p.fate == KEEP for cid in p.entries if cid in candidates}
    return IdSet(cid for cid in candidates if cid not in kept) if kept else candidates


def _writer_alive(path: Path) -> bool:
    """Whether the backup writing staged pack ``path`` (its pid is in the name) still runs."""
    try:
        pid = int(path.name.split("-")[1])
    except (IndexError, ValueError):
        return False  # not a name we wrote
    return owner_alive(pid, path.stat().st_mtime)


def _referenced(vault: Vault, backups: list[BackupId]) -> Iterator[bytes]:
    """Every chunk id the manifests of ``backups`` reference, repeats and all, one manifest in memory at a
    time. Any unreadable manifest stops gc: its chunks would look free."""
    for bid in backups:
        try:
            manifest = vault.read_manifest(bid)
        except NotFound:
            continue  # deleted meanwhile: its chunks are garbage now
        except RakshaError as err:
            raise VaultCorrupt(f"gc refuses to run: backup {bid} is unreadable ({err.message}); "
                               "run 'raksha vault verify'", backup=str(bid)) from None
        yield from manifest.iter_blob_ids()
        del manifest


def live_chunks(vault: Vault) -> tuple[IdSet, int]:
    """Every chunk id some backup references, and how many backups there are."""
    backups = vault.backup_ids()
    return IdSet(_referenced(vault, backups)), len(backups)


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
        read_ids, packs = self._mark_packs(live, t0)
        # 3. Condemn.
        condemned = self._condemn(packs, live)
        del live  # the re-mark below asks the manifests about the condemned chunks alone
        if self.report.dry_run:
            self._account(packs, bytes_written=None)
            self.report.seconds = time.monotonic() - start
            return self.report
        condemned_key = f"{LOCKS_PREFIX}{self.lock.info.id}{CONDEMNED_SUFFIX}"
        self.vault.backend.put(condemned_key, bytes(condemned.buffer()), overwrite=True)
        try:
            # 4. Wait, then re-mark: backups that finished meanwhile may use condemned chunks.
            self._wait_for_backups()
            revived = {cid for cid in _referenced(self.vault, self.vault.backup_ids())
                       if cid in condemned}  # few: what backups used meanwhile
            if revived:
                condemned = IdSet(cid for cid in condemned if cid not in revived)
            self._adopt_new_indexes(packs, read_ids)
            # 5. Sweep.
            self._sweep(packs, read_ids, condemned)
        finally:
            self.vault.backend.delete(condemned_key)
        self.report.seconds = time.monotonic() - start
        return self.report

    # -- mark and condemn ----------------------------------------------------------------------

    def _mark_packs(self, live: IdSet, t0: float) -> tuple[set[str], dict[str, _Pack]]:
        """The index objects read, and every pack with the chunks the index puts there, classified."""
        for _attempt in range(5):
            try:
                scan = self.vault.scan_index()  # raises on a damaged index: its packs would look orphaned
                packs = self._classify(scan, live, t0)
            except NotFound:
                continue  # an object went under a backup merging its index, which wrote its replacement first
            return set(scan.counts), packs
        raise VaultCorrupt("the index keeps changing while being read; is a gc looping?")

    def _classify(self, scan: IndexScan, live: IdSet, t0: float) -> dict[str, _Pack]:
        packs = {pid: _Pack(pid, size, mtime) for pid, size, mtime in self.vault.iter_packs()}
        self.report.packs_total = len(packs)
        missing: set[str] = set()
        for _index_id, f in scan.live():
            for cid, pack_id, offset, stored, raw in f.rows():
                pid = pack_id.hex()
                p = packs.get(pid)
                if p is None and pid not in missing:
                    p = self._stat_pack(pid)  # not listed: an eventually consistent listing, or lost
                    if p is None:
                        missing.add(pid)
                    else:
                        packs[pid] = p
                if p is not None:
                    p.entries.add(cid, offset, stored, raw)
        self.report.packs_missing = len(missing)
        for p in packs.values():
            p.entries.drop_repeats()
        cutoff = t0 - self.grace
        young = {p.id for p in packs.values() if p.mtime >= cutoff}
        for p in packs.values():
            if not p.entries and p.id not in young:
                self._reindex_orphan(p, live)
        # Each live chunk is counted in one pack only; prefer packs we keep anyway (young, fullest).
        counted = bytearray(len(live))  # by the live chunk's row: a byte where a set of them took ~45
        order = sorted(packs.values(), key=lambda p: (p.id not in young, -sum(
            stored for cid, stored in p.entries.stored_lengths() if cid in live), p.id))
        for p in order:
            for cid, stored in p.entries.stored_lengths():
                row = live.row_of(cid)
                if row >= 0 and not counted[row]:
                    counted[row] = 1
                    p.live_bytes += stored
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

    def _reindex_orphan(self, p: _Pack, live: IdSet) -> None:
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
        if any(e.chunk_id in live for e in entries):
            for e in entries:
                p.entries.add(e.chunk_id, e.offset, e.stored_length, e.raw_length)
            p.reindexed = True
            self.report.packs_reindexed += 1
        else:
            p.fate = ORPHAN

    def _condemn(self, packs: dict[str, _Pack], live: IdSet) -> IdSet:
        """Chunks this gc will delete: in packs going away, in no pack staying, referenced by no backup."""
        return _only_in_going(packs, live)

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

    def _adopt_new_indexes(self, packs: dict[str, _Pack], read_ids: set[str]) -> None:
        """A pack named by an index written since the mark (a backup that was storing it then) stays."""
        for info in self.vault.backend.list(INDEX_PREFIX):
            index_id = info.key[len(INDEX_PREFIX):]
            if index_id in read_ids:
                continue
            try:
                f = decode_index(self.vault.backend.get(info.key), self.vault.crypto, what=info.key)
            except NotFound:
                continue
            for _cid, pack_id, _offset, _stored, _raw in f.rows():
                p = packs.get(pack_id.hex())
                if p is not None and p.fate != KEEP:
                    p.fate = KEEP

    # -- sweep -----------------------------------------------------------------------------------

    def _sweep(self, packs: dict[str, _Pack], read_ids: set[str], condemned: IdSet) -> None:
        backend = self.vault.backend
        # 1. Copy every chunk of a pack going away that is not condemned and not in a pack that stays:
        # blobs are sealed per chunk, so they are copied verbatim. Not only the chunks live now: a backup
        # that started after the condemned list was published may use any chunk that is not on it.
        to_copy = _only_in_going(packs, condemned)
        packer = Packer(self.vault)
        copied = IdSet()
        try:
            for p in sorted(packs.values(), key=lambda p: (p.fate != REPACK, p.id)):
                if p.fate not in (REPACK, DELETE):
                    continue
                for cid, loc in p.entries.items():
                    if cid in to_copy and cid not in copied:
                        packer.add(cid, self.vault.read_blob(loc), loc.raw_length)
                        copied.add(cid)
                        p.fate = REPACK  # a DELETE pack holding a chunk that became live meanwhile
            packer.flush()
        except BaseException:
            packer.abort()
            raise
        # 2. An index of what stays, superseding every index read and those the repack wrote.
        old = list(dict.fromkeys([*sorted(read_ids), *packer.indexes_written]))
        changed = (len(old) != 1 or self.report.packs_missing > 0
                   or any(p.fate != KEEP or p.reindexed for p in packs.values()))
        if changed:
            self._write_index(packs, packer.indexes_written, old)
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

    def _write_index(self, packs: dict[str, _Pack], repacked: list[str], old: list[str]) -> None:
        """The kept packs' entries and the repack's, each chunk once, in objects of at most MERGE_ENTRIES
        (a reader holds a whole object while decoding it). The last supersedes ``old``: until it is
        durable they all count, and all hold."""
        def entries() -> Iterator[tuple[bytes, Location]]:
            for p in packs.values():
                if p.fate == KEEP:
                    yield from p.entries.items()
            for index_id in repacked:  # one per MERGE_ENTRIES chunks copied
                f = decode_index(self.vault.backend.get(index_key(index_id)), self.vault.crypto, what=index_id)
                for cid, pack_id, offset, stored, raw in f.rows():
                    yield cid, Location(pack_id, offset, stored, raw)

        # A chunk is listed once per pack holding it (format.md §7 allows it, and each pack's entries are
        # already without repeats); repacked chunks are in no kept pack. No set of every id written.
        rows, count = bytearray(), 0
        for cid, loc in entries():
            if count == MERGE_ENTRIES:
                self.vault.write_index(rows)
                rows, count = bytearray(), 0
            rows += index_rows([(cid, loc)])
            count += 1
        if rows or old:
            self.vault.write_index(rows, [bytes.fromhex(i) for i in old])

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
