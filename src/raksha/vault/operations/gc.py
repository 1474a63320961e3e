"""Garbage collection: mark-and-sweep with a grace period, safe while backups run (format.md §11).

The invariant every step keeps: a chunk is deleted only if it was published in
this gc's condemned list and no backup references it after the wait; every
other chunk of a pack that goes away is first copied into a new pack and
indexed. Deletes happen only after what replaces them is durable, so a gc
killed at any point leaves a vault that reads correctly and that the next gc
finishes cleaning.
"""

from __future__ import annotations

import errno
import itertools
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raksha.domain.errors import (
    BackendError,
    NotFound,
    RakshaError,
    StorageFull,
    VaultCorrupt,
    VaultFormatUnsupported,
    VaultLocked,
)
from raksha.vault.backends.base import ObjectInfo
from raksha.vault.engine.packer import MERGE_ENTRIES, Packer
from raksha.vault.engine.progress import Progress, ProgressCallback
from raksha.vault.format.chunk_table import IdSet
from raksha.vault.format.index import INDEX_ROW_SIZE, Location, decode_index, index_key, index_rows
from raksha.vault.format.naming import BackupId
from raksha.vault.format.pack import pack_key
from raksha.vault.format.rows_by_pack import RowsByPack
from raksha.vault.format.scratch import Partitions
from raksha.vault.format.sorted_ids import DiskIdSet
from raksha.vault.locks import Lock, LockKind
from raksha.vault.malloc import POOL
from raksha.vault.processes import owner_alive
from raksha.vault.repository import (
    CONDEMNED_SUFFIX,
    INDEX_PREFIX,
    LOCKS_PREFIX,
    IndexScan,
    Vault,
    new_id_set,
    retry_index_read,
)

KEEP, DELETE, REPACK, ORPHAN = "keep", "delete", "repack", "orphan"


class _Condemned:
    """The chunks a gc deletes: ``ids`` less ``kept`` (the few a staying pack holds too). ``ids`` is in
    memory, or in a temporary file (~6 µs a lookup, asked once about every chunk the backups reference
    in the re-mark; a Bloom filter in front cost 4 µs a lookup in Python and as much an id to build)."""

    def __init__(self, ids: IdSet | DiskIdSet) -> None:
        self.ids = ids
        self.kept: set[bytes] = set()

    def __contains__(self, cid: bytes) -> bool:
        return cid in self.ids and cid not in self.kept

    def publish(self, vault: Vault, key: str) -> None:
        """Write them to ``key`` (32 bytes an id), a staged file at a time, never whole in memory."""
        path = vault.backend.staging_dir() / f"condemned-{os.getpid()}-{os.urandom(8).hex()}.partial"
        try:
            with open(path, "wb") as f:
                batch = bytearray()
                for cid in self.ids:
                    if cid not in self.kept:
                        batch += cid
                        if len(batch) >= 1 << 20:
                            f.write(batch)
                            batch.clear()
                f.write(batch)
        except OSError as exc:
            path.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(f"no space left in {path.parent} for gc's condemned list") from exc
            raise BackendError(f"cannot stage gc's condemned list in {path.parent}: {exc}") from exc
        try:
            vault.backend.put_file(key, path, overwrite=True)
        finally:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        if isinstance(self.ids, DiskIdSet):
            self.ids.close()


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
    backups_remarked: int = 0  # written while gc ran, looked at again before the sweep
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
    """What gc decides about a pack, and the few sums it decides by; its rows stay in ``RowsByPack``."""

    id: str
    size: int
    mtime: float
    chunks: int = 0  # distinct chunks the index (or, for an orphan, its header) puts here
    blob_bytes: int = 0  # their stored bytes
    full_live: int = 0  # stored bytes of its live chunks, each counted in every pack holding it
    live_bytes: int = 0  # the same, each live chunk counted in one pack only
    fate: str = KEEP  # keep | delete | repack | orphan
    reindexed: bool = False

    @property
    def going(self) -> bool:
        return self.fate in (DELETE, REPACK)


def _distinct(entries: list[tuple[bytes, Location]]) -> Iterator[tuple[bytes, Location]]:
    """A pack's entries, each chunk once (two index objects, or two offsets, may list it twice)."""
    seen: set[bytes] = set()
    for cid, loc in entries:
        if cid not in seen:
            seen.add(cid)
            yield cid, loc


def _writer_alive(path: Path) -> bool:
    """Whether the backup writing staged pack ``path`` (its pid is in the name) still runs."""
    try:
        pid = int(path.name.split("-")[1])
    except (IndexError, ValueError):
        return False  # not a name we wrote
    return owner_alive(pid, path.stat().st_mtime)


REMARK_RECENT = 60.0  # seconds before the mark whose manifests the re-mark reads again: coarse mtimes, skew


def _referenced(vault: Vault, backups: list[BackupId], meter: Progress | None = None) -> Iterator[bytes]:
    """Every chunk id the manifests of ``backups`` reference, repeats and all, one manifest in memory at a
    time. Any unreadable manifest stops gc: its chunks would look free."""
    for bid in backups:
        if meter is not None:
            meter.add(1)
        try:
            manifest = vault.read_manifest(bid)
        except NotFound:
            continue  # deleted meanwhile: its chunks are garbage now
        except RakshaError as err:
            raise VaultCorrupt(f"gc refuses to run: backup {bid} is unreadable ({err.message}); "
                               "run 'raksha vault verify'", backup=str(bid)) from None
        yield from manifest.iter_blob_ids()
        del manifest


def collect_garbage(vault: Vault, *, grace: float = 3600.0, max_wait: float = 600.0,
                    repack_threshold: float = 0.25, dry_run: bool = False, poll: float = 1.0,
                    clock: Callable[[], float] = time.time, progress: ProgressCallback | None = None) -> GcReport:
    """``progress`` hears of the mark ("gc: mark", backups read) and the repack ("gc: repack", bytes
    copied), the two phases that take long on a large vault."""
    POOL.clear()  # a backup's idle buffers: gc's index and marks are the process's peak
    with vault.locks.acquire(LockKind.MAINTENANCE, "gc") as lock:
        return _Gc(vault, grace, max_wait, repack_threshold, dry_run, poll, clock, lock, progress).run()


class _RowsByChunk:
    """The index's rows as (chunk id, pack number, stored length), spread over ``partitions`` by the
    chunk's hash as a ``DiskIdSet``'s ids are, to be joined with it partition by partition."""

    _ROW = struct.Struct("<32sII")

    def __init__(self, partitions: int) -> None:
        self._parts = Partitions(partitions, 4 << 20, "the index's rows by chunk", min_flush=64 * self._ROW.size)
        self._mask = partitions - 1
        self._numbers: dict[bytes, int] = {}
        self.pack_ids: list[bytes] = []

    def add_rows(self, rows: Iterable[tuple[bytes, bytes, int, int, int]]) -> None:
        parts, mask, numbers, pack_row = self._parts, self._mask, self._numbers, self._ROW.pack
        buffers, flush_at = parts.buffers, parts.flush_at
        last_pack_id, number = b"", 0
        for cid, pack_id, _offset, stored, _raw in rows:
            if pack_id != last_pack_id:  # an index object lists a pack's chunks together
                found = numbers.get(pack_id)
                if found is None:
                    found = numbers[pack_id] = len(self.pack_ids)
                    self.pack_ids.append(pack_id)
                last_pack_id, number = pack_id, found
            part = hash(cid) & mask
            buf = buffers[part]
            buf += pack_row(cid, number, stored)
            if len(buf) >= flush_at:
                parts.spill(part)

    def rows(self, part: int) -> Iterator[tuple[bytes, int, int]]:
        """Partition ``part``'s rows, each (chunk, pack) once: a pack's chunk listed twice counts once."""
        data, size = self._parts.take(part), self._ROW.size
        for record in {data[i : i + size] for i in range(0, len(data), size)}:
            yield self._ROW.unpack(record)

    def close(self) -> None:
        self._parts.close()


class _Gc:
    """One gc. What it holds follows the packs and what it deletes, not the chunks the vault stores: the
    index's rows are grouped by pack out of memory (``RowsByPack``), the live chunks are an id set (on
    disk past IDS_IN_MEMORY) with a byte each beside it, and each pass goes over the rows again."""

    def __init__(self, vault: Vault, grace: float, max_wait: float, threshold: float, dry_run: bool,
                 poll: float, clock: Callable[[], float], lock: Lock, progress: ProgressCallback | None) -> None:
        self.vault = vault
        self.progress = progress
        self.grace = grace
        self.max_wait = max_wait
        self.threshold = threshold
        self.poll = poll
        self.clock = clock
        self.lock = lock
        self.report = GcReport(dry_run)
        self.live: IdSet | DiskIdSet = IdSet()
        self.holders = bytearray()  # by live chunk's row: how many packs hold it (2: two or more)
        self.shared = 0  # live chunks two packs or more hold (usually none: then a pass is skipped)
        self.packs: dict[str, _Pack] = {}
        self.by_chunk: _RowsByChunk | None = None  # the rows again, by chunk, with the live set on disk
        self.marked: dict[BackupId, ObjectInfo] = {}  # the manifests the mark read, as they were listed
        self.marked_at = 0.0

    def run(self) -> GcReport:
        start = time.monotonic()
        t0 = self.clock()
        if not self.report.dry_run:
            self._drop_stale_condemned_lists()
            self._drop_stale_staging_files(t0 - self.grace)
        # 2. Mark.
        read_ids, rows = self._mark()
        condemned: _Condemned | None = None
        try:
            self._classify(rows, t0)
            # 3. Condemn.
            condemned = self._condemn(rows)
            if self.report.dry_run:
                self._account(bytes_written=None)
                self.report.seconds = time.monotonic() - start
                return self.report
            condemned_key = f"{LOCKS_PREFIX}{self.lock.info.id}{CONDEMNED_SUFFIX}"
            try:
                condemned.publish(self.vault, condemned_key)
                # 4. Wait, then re-mark: backups that finished meanwhile may use condemned chunks.
                self._wait_for_backups()
                revived = {cid for cid in _referenced(self.vault, self._written_since_mark())
                           if cid in condemned}  # few: what backups used meanwhile
                condemned.close()
                self._adopt_new_indexes(read_ids)
                # 5. Sweep.
                self._sweep(rows, read_ids, revived)
            finally:
                self.vault.backend.delete(condemned_key)
        finally:
            if condemned is not None:
                condemned.close()
            rows.close()
            if self.by_chunk is not None:
                self.by_chunk.close()
            if isinstance(self.live, DiskIdSet):
                self.live.close()
        self.report.seconds = time.monotonic() - start
        return self.report

    # -- mark and condemn ----------------------------------------------------------------------

    def _mark(self) -> tuple[set[str], RowsByPack]:
        """The live chunks (``self.live``), the index objects read, and their rows by pack. With the live
        chunks on disk, the rows also go to ``self.by_chunk``, spread as the live set's runs are.

        Backups are listed before the index is read: a backup writes its index before its manifest, so
        every chunk of a backup listed here is in the index read next (or in a pack younger than t0).
        """
        def attempt() -> tuple[list[BackupId], IndexScan, IdSet | DiskIdSet, RowsByPack, _RowsByChunk | None]:
            self.marked_at, self.marked = self.clock(), self.vault.backup_objects()
            backups = sorted(self.marked)
            scan = self.vault.scan_index()  # raises on a damaged index: its packs would look orphaned
            live = new_id_set(scan.live_entries, "the chunks backups use")
            rows = RowsByPack(scan.live_entries, "the index's rows by pack")
            by_chunk: _RowsByChunk | None = None
            try:
                meter = Progress("gc: mark", len(backups), self.progress, unit="backups")
                live.update(_referenced(self.vault, backups, meter))
                meter.finish()
                if isinstance(live, DiskIdSet):
                    live.finish()
                    by_chunk = _RowsByChunk(live.partitions)
                for _index_id, f in scan.live():
                    rows.add_rows(f.rows())
                    if by_chunk is not None:
                        by_chunk.add_rows(f.rows())
            except BaseException:
                rows.close()
                if by_chunk is not None:
                    by_chunk.close()
                if isinstance(live, DiskIdSet):
                    live.close()
                raise
            return backups, scan, live, rows, by_chunk

        backups, scan, live, rows, by_chunk = retry_index_read(attempt)
        self.live, self.holders, self.by_chunk = live, bytearray(len(live)), by_chunk
        self.report.backups, self.report.live_chunks = len(backups), len(live)
        return set(scan.counts), rows


    def _written_since_mark(self) -> list[BackupId]:
        """The manifests the re-mark must read: those the mark did not list as they are now, and any written
        shortly before it. A manifest is written once, so one the mark read references only chunks it
        marked live, none condemned; reading only the others makes the re-mark cost what was backed up
        meanwhile, not the vault. The recent ones are read too: a backup deleted and made again under its
        id within an object store's mtime resolution would otherwise look unchanged."""
        recent = self.marked_at - REMARK_RECENT

        def unseen(bid: BackupId, info: ObjectInfo) -> bool:
            seen = self.marked.get(bid)
            return seen is None or (seen.size, seen.mtime) != (info.size, info.mtime) or info.mtime >= recent

        since = sorted(bid for bid, info in self.vault.backup_objects().items() if unseen(bid, info))
        self.report.backups_remarked = len(since)
        return since

    def _classify(self, rows: RowsByPack, t0: float) -> None:
        packs = self.packs = {pid: _Pack(pid, size, mtime) for pid, size, mtime in self.vault.iter_packs()}
        self.report.packs_total = len(packs)
        missing: set[str] = set()
        for pack_id, entries in rows.packs():
            pid = pack_id.hex()
            p = packs.get(pid)
            if p is None and pid not in missing:
                p = self._stat_pack(pid)  # not listed: an eventually consistent listing, or lost
                if p is None:
                    missing.add(pid)
                else:
                    packs[pid] = p
            if p is not None:
                self._tally(p, entries, live=self.by_chunk is None)
        if self.by_chunk is not None:
            self._tally_live_by_join(self.by_chunk)
        self.report.packs_missing = len(missing)
        cutoff = t0 - self.grace
        young = {p.id for p in packs.values() if p.mtime >= cutoff}
        for p in list(packs.values()):
            if not p.chunks and p.id not in young:
                self._reindex_orphan(p, rows)
        self._count_live_once(rows, young)
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

    def _tally(self, p: _Pack, entries: list[tuple[bytes, Location]], *, live: bool = True) -> None:
        """Count a pack's chunks and bytes, and with ``live`` its live ones (a lookup each)."""
        holders = self.holders
        for cid, loc in _distinct(entries):
            p.chunks += 1
            p.blob_bytes += loc.stored_length
            if not live:
                continue
            row = self.live.row_of(cid)
            if row >= 0:
                p.full_live += loc.stored_length
                if holders[row] < 2:
                    holders[row] += 1
                    self.shared += holders[row] == 2

    def _tally_live_by_join(self, by_chunk: _RowsByChunk) -> None:
        """``_tally``'s live half for every indexed pack, with the live set on disk: its runs are read
        one at a time into a dict and the rows spread the same way are looked up there (a lookup on
        disk each took ~7 µs)."""
        live, holders = self.live, self.holders
        assert isinstance(live, DiskIdSet)
        owners = [self.packs.get(pack_id.hex()) for pack_id in by_chunk.pack_ids]  # None: missing
        for part in range(live.partitions):
            rows_of = live.partition_rows(part)
            for cid, number, stored in by_chunk.rows(part):
                row = rows_of.get(cid)
                p = owners[number]
                if row is None or p is None:
                    continue
                p.full_live += stored
                if holders[row] < 2:
                    holders[row] += 1
                    self.shared += holders[row] == 2

    def _count_live_once(self, rows: RowsByPack, young: set[str]) -> None:
        """Each live chunk's bytes counted in one pack only. A chunk only one pack holds is counted
        there; one that several hold, in the best of them: young (kept anyway), then the fullest."""
        packs, live, holders = self.packs, self.live, self.holders
        if not self.shared:
            for each in packs.values():
                each.live_bytes = each.full_live
            return
        rank = {p.id: n for n, p in enumerate(sorted(packs.values(),
                                                     key=lambda p: (p.id not in young, -p.full_live, p.id)))}
        shared: dict[bytes, tuple[int, str, int]] = {}  # chunk -> its best holder's rank, id, stored bytes
        for pack_id, entries in rows.packs():
            p = packs.get(pack_id.hex())
            if p is None:
                continue  # missing
            for cid, loc in _distinct(entries):
                row = live.row_of(cid)
                if row < 0:
                    continue
                if holders[row] == 1:
                    p.live_bytes += loc.stored_length
                else:
                    best = shared.get(cid)
                    if best is None or rank[p.id] < best[0]:
                        shared[cid] = (rank[p.id], p.id, loc.stored_length)
        for _rank, pid, stored in shared.values():
            packs[pid].live_bytes += stored

    def _stat_pack(self, pid: str) -> _Pack | None:
        try:
            info = self.vault.backend.stat(pack_key(pid))
        except NotFound:
            return None
        return _Pack(pid, info.size, info.mtime)

    def _reindex_orphan(self, p: _Pack, rows: RowsByPack) -> None:
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
        if any(e.chunk_id in self.live for e in entries):
            pack_id = bytes.fromhex(p.id)
            found = [(e.chunk_id, pack_id, e.offset, e.stored_length, e.raw_length) for e in entries]
            rows.add_rows(found)
            self._tally(p, [(cid, Location(pid, offset, stored, raw)) for cid, pid, offset, stored, raw in found])
            p.reindexed = True
            self.report.packs_reindexed += 1
        else:
            p.fate = ORPHAN

    def _condemn(self, rows: RowsByPack) -> _Condemned:
        """Chunks this gc will delete: in packs going away, in no pack staying, referenced by no backup.
        What it holds follows what it deletes: past ``IDS_IN_MEMORY`` of them (a gc after a large prune)
        they are in a temporary file."""
        packs, live = self.packs, self.live
        going = [p for p in packs.values() if p.going]
        if not going:
            return _Condemned(IdSet())  # the rows are not read again
        candidates = new_id_set(sum(p.chunks for p in going), "the chunks this gc condemns")
        for pack_id, entries in rows.packs():
            p = packs.get(pack_id.hex())
            if p is not None and p.going:
                candidates.update(cid for cid, _loc in entries if cid not in live)
        if isinstance(candidates, DiskIdSet):
            candidates.finish()
        condemned = _Condemned(candidates)
        if len(candidates):
            # Few: chunks stored twice, in a pack going away and in one staying.
            condemned.kept = {cid for pack_id, entries in rows.packs() if (p := packs.get(pack_id.hex()))
                              is not None and p.fate == KEEP for cid, _loc in entries if cid in condemned}
        return condemned

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

    def _adopt_new_indexes(self, read_ids: set[str]) -> None:
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
                p = self.packs.get(pack_id.hex())
                if p is not None and p.fate != KEEP:
                    p.fate = KEEP

    # -- sweep -----------------------------------------------------------------------------------

    def _sweep(self, rows: RowsByPack, read_ids: set[str], revived: set[bytes]) -> None:
        backend, packs, live, holders = self.vault.backend, self.packs, self.live, self.holders
        # 1. Copy every chunk of a pack going away that is not condemned and not in a pack that stays:
        # the live chunks and the revived ones (a backup that started after the condemned list was
        # published may use any chunk not on it: those are all it can use). Blobs are sealed per chunk,
        # so they are copied verbatim. A chunk several packs hold (or a revived one) is looked at across
        # them first: copied if none stays, and once.
        several: dict[bytes, bool] = {}  # chunk -> a pack that stays holds it (few: chunks stored twice)
        for pack_id, entries in rows.packs() if self.shared or revived else ():
            p = packs.get(pack_id.hex())
            if p is None:
                continue
            for cid, _loc in _distinct(entries):
                row = live.row_of(cid)
                if (row >= 0 and holders[row] > 1) or (row < 0 and cid in revived):
                    several[cid] = several.get(cid, False) or p.fate == KEEP
        packer = Packer(self.vault)
        # Each live chunk's bytes are counted in one pack: those of the packs repacked are what is copied
        # (a revived chunk adds to it, a chunk a staying pack also holds takes from it).
        meter = Progress("gc: repack", sum(p.live_bytes for p in packs.values() if p.fate == REPACK), self.progress)
        try:
            # Packs being repacked first: a chunk a DELETE pack also holds is then copied from them.
            for entries, p in itertools.chain(self._packs_of_fate(rows, REPACK), self._packs_of_fate(rows, DELETE)):
                for cid, loc in _distinct(entries):
                    row = live.row_of(cid)
                    if row >= 0 and holders[row] == 1:
                        pass  # live, and only here
                    elif cid in several and not several[cid]:
                        several[cid] = True  # copied once
                    else:
                        continue
                    packer.add(cid, self.vault.read_blob(loc), loc.raw_length)
                    meter.add(loc.stored_length)
                    p.fate = REPACK  # a DELETE pack holding a chunk that became live meanwhile
            packer.flush()
            if meter.done:
                meter.total = meter.done  # the estimate was close: the bar ends at 100%
                meter.finish()
        except BaseException:
            packer.abort()
            raise
        # 2. An index of what stays, superseding every index read and those the repack wrote.
        old = list(dict.fromkeys([*sorted(read_ids), *packer.indexes_written]))
        changed = (len(old) != 1 or self.report.packs_missing > 0
                   or any(p.fate != KEEP or p.reindexed for p in packs.values()))
        if changed:
            self._write_index(rows, packer.indexes_written, old)
            # 3. The new index is durable: the old ones can go. (Index objects carry a nonce, so no
            # later index can reuse one of these ids and be hidden by the supersedes list.)
            for index_id in old:
                backend.delete(index_key(index_id))
            self.report.indexes_consolidated = len(old)
        # 4. Only now, with every surviving chunk indexed elsewhere, delete packs.
        for p in packs.values():
            if p.fate in (DELETE, REPACK, ORPHAN):
                backend.delete(pack_key(p.id))
        self._account(bytes_written=packer.bytes_written)

    def _packs_of_fate(self, rows: RowsByPack, fate: str) -> Iterator[tuple[list[tuple[bytes, Location]], _Pack]]:
        """The entries of each pack of ``fate``, a pack at a time (a pass over the rows only if there are any)."""
        if not any(p.fate == fate for p in self.packs.values()):
            return
        for pack_id, entries in rows.packs():
            p = self.packs.get(pack_id.hex())
            if p is not None and p.fate == fate:
                yield entries, p

    def _write_index(self, rows: RowsByPack, repacked: list[str], old: list[str]) -> None:
        """The kept packs' entries and the repack's, each chunk once, in objects of at most MERGE_ENTRIES
        (a reader holds a whole object while decoding it). The last supersedes ``old``: until it is
        durable they all count, and all hold."""
        def entries() -> Iterator[tuple[bytes, Location]]:
            for pack_id, pack_entries in rows.packs():
                p = self.packs.get(pack_id.hex())
                if p is not None and p.fate == KEEP:
                    yield from _distinct(pack_entries)
            for index_id in repacked:  # one per MERGE_ENTRIES chunks copied
                f = decode_index(self.vault.backend.get(index_key(index_id)), self.vault.crypto, what=index_id)
                for cid, pack_id, offset, stored, raw in f.rows():
                    yield cid, Location(pack_id, offset, stored, raw)

        # A chunk is listed once per pack holding it (format.md §7 allows it, and each pack's entries are
        # without repeats); repacked chunks are in no kept pack. No set of every id written.
        rest = entries()
        out = index_rows(itertools.islice(rest, MERGE_ENTRIES))
        while len(out) == MERGE_ENTRIES * INDEX_ROW_SIZE:
            more = index_rows(itertools.islice(rest, MERGE_ENTRIES))
            if not more:
                break
            self.vault.write_index(out)
            out = more
        if out or old:
            self.vault.write_index(out, [bytes.fromhex(i) for i in old])

    def _account(self, bytes_written: int | None) -> None:
        """Fill the report from the packs' fates; a dry run estimates what a repack would write."""
        r, packs = self.report, self.packs.values()
        r.packs_deleted = sum(p.fate == DELETE for p in packs)
        r.packs_repacked = sum(p.fate == REPACK for p in packs)
        r.orphan_packs_deleted = sum(p.fate == ORPHAN for p in packs)
        removed = sum(p.size for p in packs if p.fate in (DELETE, REPACK, ORPHAN))
        if bytes_written is None:
            bytes_written = sum(p.live_bytes for p in packs if p.fate == REPACK)
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
