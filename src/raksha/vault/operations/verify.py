"""Verify: re-read and re-hash everything the vault stores, and name each damaged backup.

Damage is pinned to the smallest unit that shows it: a pack whose bytes no
longer match its name is still opened entry by entry, so one flipped bit
condemns one chunk (and the backups using it), not the whole pack.

Memory follows a pack, not the vault: the index's rows are grouped by pack out
of memory (``RowsByPack``), each pack is read once and every blob the index
lists in it checked, the chunks found sound go into an id set (on disk past
IDS_IN_MEMORY), and then each backup's manifest is streamed against that set.
"""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import blake3
import zstandard

from raksha.domain.data_subset import DataSubset
from raksha.domain.errors import InvalidInput, NotFound, RakshaError
from raksha.vault.engine.progress import Progress, ProgressCallback
from raksha.vault.engine.workers import run_parallel
from raksha.vault.format.blob import decode_blob
from raksha.vault.format.chunk_ids import ChunkIds
from raksha.vault.format.chunk_table import ChunkLocator, IdSet
from raksha.vault.format.constants import ID_SIZE, ZERO_ID
from raksha.vault.format.index import Location
from raksha.vault.format.manifest import Manifest
from raksha.vault.format.naming import BackupId
from raksha.vault.format.pack import check_preamble, pack_key
from raksha.vault.format.rows_by_pack import PackRows, RowsByPack
from raksha.vault.format.sorted_ids import DiskIdSet
from raksha.vault.locks import LockKind
from raksha.vault.malloc import POOL
from raksha.vault.repository import Vault, new_id_set, retry_index_read


@dataclass
class VerifyReport:
    backups_checked: int = 0
    chunks_checked: int = 0
    packs_checked: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    read_data: bool = True
    read_data_subset: str | None = None  # DataSubset.spec: only those packs' data was read
    packs_not_read: int = 0  # with a subset: packs checked for presence and size only
    damaged_objects: list[dict[str, str]] = field(default_factory=list)
    damaged_backups: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.damaged_objects and not self.damaged_backups

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "backups_checked": self.backups_checked, "chunks_checked": self.chunks_checked,
                "packs_checked": self.packs_checked, "bytes_read": self.bytes_read, "read_data": self.read_data,
                "read_data_subset": self.read_data_subset, "packs_not_read": self.packs_not_read,
                "seconds": round(self.seconds, 3), "damaged_objects": self.damaged_objects,
                "damaged_backups": self.damaged_backups}

    def summary(self) -> str:
        head = (f"checked {self.backups_checked} backups, {self.chunks_checked} chunks in {self.packs_checked} "
                f"packs ({self.bytes_read / 1e6:.1f} MB read) in {self.seconds:.1f} s")
        if self.read_data_subset is not None:
            head += (f"; data read of subset {self.read_data_subset} only: {self.packs_not_read} more packs "
                     "checked for presence and size")
        if self.ok:
            return head + ": no damage found"
        lines = [head + ": DAMAGE FOUND"]
        lines += [f"  damaged object {d['object']}: {d['error']}" for d in self.damaged_objects]
        for bid, reasons in sorted(self.damaged_backups.items()):
            lines.append(f"  damaged backup {bid}: {reasons[0]}" + (f" (+{len(reasons) - 1} more)"
                                                                    if len(reasons) > 1 else ""))
        return "\n".join(lines)


def verify_vault(vault: Vault, *, read_data: bool = True, subset: DataSubset | None = None,
                 threads: int | None = None, progress: ProgressCallback | None = None,
                 rng: random.Random | None = None) -> VerifyReport:
    """``subset``: read only those packs' data (``DataSubset``); ``rng`` draws a percentage's packs."""
    if subset is not None and not read_data:
        raise InvalidInput("a data subset needs the data read: read_data is off", code="SUBSET_INVALID")
    POOL.clear()  # a backup's idle buffers, not used here
    with vault.locks.acquire(LockKind.SHARED, "verify"):
        # A piece of a pack (READ_PIECE) in memory per thread: one thread per core keeps RSS bounded.
        return _Verify(vault, read_data, threads or os.cpu_count() or 2, progress, subset, rng).run()


READ_PIECE = 4 << 20  # a pack is read in pieces of this size (one per thread in memory, not the pack)


def _ids_not_in(manifest: Manifest, previous: ChunkIds | None) -> Iterator[bytes]:
    """The blob ids ``manifest`` uses, but those at the same place in ``previous`` (another manifest's
    chunk ids; repeats and all, never the zero id). Its layers are all given."""
    if previous is None:
        yield from manifest.iter_blob_ids()
        return
    before = previous.pieces()
    for piece in manifest.chunk_ids.pieces():
        old = next(before, b"")
        if piece == old:  # in C: most pieces of an incremental's manifest are its parent's
            continue
        old_ids = _ID.iter_unpack(old)
        for (cid,) in _ID.iter_unpack(piece):
            if next(old_ids, (b"",))[0] != cid and cid != ZERO_ID:
                yield cid
    yield from manifest.deltas.blob_ids()


_ID = struct.Struct(f"{ID_SIZE}s")


class _Verify:
    def __init__(self, vault: Vault, read_data: bool, threads: int, progress: ProgressCallback | None,
                 subset: DataSubset | None = None, rng: random.Random | None = None) -> None:
        self.vault = vault
        self.read_data = read_data
        self.threads = threads
        self.callback = progress
        self.subset = subset
        self.rng = rng or random.Random()
        self.report = VerifyReport(read_data=read_data, read_data_subset=subset.spec if subset else None)
        self.sound: IdSet | DiskIdSet = IdSet()  # chunks with a copy that checked out
        self.bad_chunks: dict[bytes, str] = {}  # chunks with a copy that did not (usually none)
        self.missing_packs: dict[str, list[bytes]] = {}  # pack key -> the chunks the index put there
        self.pack_sizes: dict[str, int] | None = None  # without reading data: the listing's sizes
        self.lock = threading.Lock()

    def damaged(self, key: str, err: str) -> None:
        with self.lock:
            self.report.damaged_objects.append({"object": key, "error": err})

    def run(self) -> VerifyReport:
        start = time.monotonic()
        # Backups are listed before the index is read: a backup indexes its chunks before it writes its
        # manifest, so every backup listed here finds its chunks in the index read next. One that
        # commits later is not checked; one deleted meanwhile is skipped.
        backups = self.vault.backup_ids()
        rows = self._index_rows()
        try:
            self.sound = new_id_set(rows.rows, "the chunks verify found sound")
            self._check(rows.packs(), rows.stored_bytes, self.subset)
            rows.close()  # before the manifests: its file is 80 bytes a row
            if self.missing_packs:
                self._recheck_moved()
            if isinstance(self.sound, DiskIdSet):
                self.sound.finish()
            self._check_backups(backups)
        finally:
            rows.close()
            if isinstance(self.sound, DiskIdSet):
                self.sound.close()
        self.report.seconds = time.monotonic() - start
        return self.report

    def _index_rows(self) -> RowsByPack:
        """Every row of the index, grouped by pack out of memory. An index object that does not decode is
        reported and left out; one whose bytes do not match its name is reported and still used."""
        damaged: dict[str, str] = {}

        def attempt() -> RowsByPack:
            damaged.clear()  # what a try that started over found
            scan = self.vault.scan_index(damaged, check_names=True)
            rows = RowsByPack(scan.live_entries, "the index's rows by pack")
            try:
                for _index_id, f in scan.live():
                    rows.add_rows(f.rows())
            except BaseException:
                rows.close()
                raise
            return rows

        rows = retry_index_read(attempt)
        for key, why in damaged.items():
            self.damaged(key, why)
        return rows


    def _check(self, packs: Iterator[PackRows], total: int, subset: DataSubset | None = None) -> None:
        """Each pack once: every blob the index lists in it is read and decoded (or, without reading
        data or outside ``subset``, must lie within the pack). Sound chunks go to ``sound``, the others
        to ``bad_chunks``; packs that are gone to ``missing_packs``."""
        if not self.read_data:
            for item in packs:
                self._stat_pack(item)
            return
        if subset is not None:
            packs = self._read_only(packs, subset)
            total = round(total * subset.fraction)  # the progress's estimate: which packs is known as they come
        meter = Progress("verify", total, self.callback)
        local = threading.local()

        def check(item: PackRows) -> None:
            pack_id, entries = item
            key = pack_key(pack_id.hex())
            dec = getattr(local, "d", None)
            if dec is None:
                dec = local.d = zstandard.ZstdDecompressor()
            sound: list[bytes] = []

            def blob_checked(cid: bytes, loc: Location, blob: bytes | bytearray | memoryview) -> None:
                try:
                    decode_blob(bytes(blob), cid, loc.raw_length, self.vault.crypto, dec, what=f"{key}@{loc.offset}")
                except RakshaError as err:
                    self._bad(cid, f"chunk {cid.hex()} in {key}: {err.message}")
                else:
                    sound.append(cid)
                meter.add(loc.stored_length)

            try:
                size = self._read_pack(key, entries, blob_checked)
            except NotFound:
                with self.lock:
                    self.missing_packs[key] = [cid for cid, _ in entries]
                return
            with self.lock:
                self.sound.update(sound)
                self.report.chunks_checked += len(entries)
                self.report.packs_checked += 1
                self.report.bytes_read += size

        run_parallel(packs, check, self.threads)
        meter.finish()

    def _read_only(self, packs: Iterator[PackRows], subset: DataSubset) -> Iterator[PackRows]:
        """The packs of ``subset``; the others are checked for presence and size on the way."""
        for item in packs:
            if subset.includes(item[0], self.rng):
                yield item
            else:
                self._stat_pack(item)
                with self.lock:
                    self.report.packs_not_read += 1

    def _stat_pack(self, item: PackRows) -> None:
        """Without reading data: the pack must exist and be long enough for the blobs it is said to hold."""
        pack_id, entries = item
        if self.pack_sizes is None:
            self.pack_sizes = {pid: size for pid, size, _mtime in self.vault.iter_packs()}
        key = pack_key(pack_id.hex())
        size = self.pack_sizes.get(pack_id.hex())
        if size is None:
            try:
                size = self.vault.backend.stat(key).size  # not listed yet: written since the listing
            except NotFound:
                with self.lock:  # beside the threads reading a subset's packs
                    self.missing_packs[key] = [cid for cid, _ in entries]
                return
        sound = []
        for cid, loc in entries:
            if loc.offset + loc.stored_length > size - 4:
                self._bad(cid, f"chunk {cid.hex()} in {key}: the pack is too short (truncated)")
            else:
                sound.append(cid)
        with self.lock:
            self.sound.update(sound)

    def _check_backups(self, backups: list[BackupId]) -> None:
        """Each backup's manifest streamed against what the packs held: a chunk it uses that had a damaged
        copy, or no sound one, names it damaged (one reason a chunk).

        A disk's backups are taken one after another: an incremental's ids are mostly its parent's, at
        the same places, and are looked up only where they differ from the last manifest read, if that
        one was whole (a lookup in an on-disk set costs ~7 µs; the comparison, pieces at a time, far less)."""
        sound, bad = self.sound, self.bad_chunks
        previous: ChunkIds | None = None  # the last manifest's chunk ids, if every chunk it uses is sound
        for bid in sorted(backups, key=lambda b: (b.job, b.vm, b.resource, b.run)):
            try:
                manifest = self.vault.read_manifest(bid)
            except NotFound:
                continue  # deleted since it was listed: nothing left to check
            except RakshaError as err:
                self.report.backups_checked += 1
                self._damaged_backup(str(bid), f"{err.code}: {err.message}")
                continue
            self.report.backups_checked += 1
            try:
                self.vault.read_metadata(bid)
            except RakshaError as err:  # its data is still checked: a restore does not need the metadata
                self._damaged_backup(str(bid), f"metadata: {err.code}: {err.message}")
            reported: set[bytes] = set()
            for cid in _ids_not_in(manifest, previous):
                why = bad.get(cid)
                if why is None and cid not in sound:
                    why = f"chunk {cid.hex()} is missing (no index entry)"
                if why is not None and cid not in reported:
                    reported.add(cid)
                    self._damaged_backup(str(bid), why)
            # Its ids only, not its layers (a layered terabyte's are tens of MB): held besides the next.
            previous = None if reported else manifest.chunk_ids
            del manifest

    def _damaged_backup(self, bid: str, why: str) -> None:
        self.report.damaged_backups.setdefault(bid, []).append(why)

    def _read_pack(self, key: str, entries: list[tuple[bytes, Location]],
                   check: Callable[[bytes, Location, bytes | bytearray | memoryview], None]) -> int:
        """Read a pack front to back in pieces of READ_PIECE, hashing it and handing each wanted blob
        (``entries``, by offset) to ``check`` as soon as it is whole; then check its name and header.
        A thread holds a piece and a blob, not the pack (32 MiB by default, up to 1 GiB)."""
        size = self.vault.backend.stat(key).size
        hasher = blake3.blake3()
        window, window_start, n = bytearray(), 0, 0  # pack bytes [window_start, window_start + len(window))
        preamble_ok = size > 0
        for pos in range(0, size, READ_PIECE):
            piece = self.vault.backend.get_range(key, pos, min(READ_PIECE, size - pos))
            if pos == 0:
                try:
                    check_preamble(piece, size, what=key)
                except RakshaError as err:
                    self.damaged(key, f"header: {err.code}: {err.message}")
                    preamble_ok = False
            hasher.update(piece)
            window += piece
            window_end = window_start + len(window)
            while n < len(entries) and entries[n][1].offset + entries[n][1].stored_length <= window_end:
                cid, loc = entries[n]
                start = loc.offset - window_start
                check(cid, loc, memoryview(window)[start : start + loc.stored_length])
                n += 1
            keep = entries[n][1].offset - window_start if n < len(entries) else len(window)
            del window[: max(0, min(keep, len(window)))]
            window_start = window_end - len(window)
            if len(piece) < min(READ_PIECE, size - pos):
                break  # shorter than listed: the rest is missing
        for cid, loc in entries[n:]:  # past the end of a truncated pack: reported as its decoding fails
            start = loc.offset - window_start
            check(cid, loc, memoryview(window)[max(0, start) : max(0, start + loc.stored_length)])
        if hasher.hexdigest() != key.rsplit("/", 1)[-1]:
            self.damaged(key, "content does not match its name (damaged or truncated)")
        if not preamble_ok:
            if size == 0:
                self.damaged(key, "header: VAULT_CORRUPT: truncated pack")
            return size
        try:
            self.vault.read_pack_header(key.rsplit("/", 1)[-1], size)
        except NotFound:
            raise
        except RakshaError as err:
            self.damaged(key, f"header: {err.code}: {err.message}")
        return size

    def _recheck_moved(self) -> None:
        """Packs that vanished while we ran: a gc that repacked them has indexed their chunks elsewhere,
        and one that deleted them (all garbage) indexes them nowhere.

        Moved chunks are checked where the index now puts them; a pack is reported missing only if the
        index still names it. A chunk no longer indexed is missing for any backup that uses it.
        """
        gone, self.missing_packs = self.missing_packs, {}
        fresh = ChunkLocator()
        fresh.add_ids(c for cids in gone.values() for c in cids)
        self.vault.load_index(locate=fresh, check_names=True)
        moved = RowsByPack(len(fresh), "chunks a gc moved")
        try:
            for key, cids in gone.items():
                still = []
                for cid in cids:
                    loc = fresh.get(cid)
                    if loc is None:
                        self._bad(cid, f"chunk {cid.hex()} is missing: its pack {key} is gone")
                    elif pack_key(loc.pack_id.hex()) == key:
                        still.append(cid)
                    else:
                        moved.add_rows([(cid, loc.pack_id, loc.offset, loc.stored_length, loc.raw_length)])
                if still:
                    self.missing_packs[key] = still
            del fresh
            self._check(moved.packs(), moved.stored_bytes)  # a pack gone again now is reported, not chased
        finally:
            moved.close()
        for key in sorted(self.missing_packs):
            self.damaged(key, "missing")
            for cid in self.missing_packs[key]:
                self._bad(cid, f"chunk {cid.hex()} is missing: its pack {key} is gone")

    def _bad(self, cid: bytes, why: str) -> None:
        with self.lock:
            self.bad_chunks.setdefault(cid, why)
