"""Verify: re-read and re-hash everything the backups reference, and name each damaged backup.

Damage is pinned to the smallest unit that shows it: a pack whose bytes no
longer match its name is still opened entry by entry, so one flipped bit
condemns one chunk (and the backups using it), not the whole pack.
"""

from __future__ import annotations

import os
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import blake3
import zstandard

from raksha.domain.errors import NotFound, RakshaError
from raksha.vault.engine.progress import Progress, ProgressCallback
from raksha.vault.engine.workers import run_parallel
from raksha.vault.format.blob import decode_blob
from raksha.vault.format.chunk_table import ChunkLocator, ChunkTable
from raksha.vault.format.index import Location
from raksha.vault.format.naming import BackupId
from raksha.vault.format.pack import check_preamble, pack_key
from raksha.vault.locks import LockKind
from raksha.vault.repository import Vault


@dataclass
class VerifyReport:
    backups_checked: int = 0
    chunks_checked: int = 0
    packs_checked: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    read_data: bool = True
    damaged_objects: list[dict[str, str]] = field(default_factory=list)
    damaged_backups: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.damaged_objects and not self.damaged_backups

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "backups_checked": self.backups_checked, "chunks_checked": self.chunks_checked,
                "packs_checked": self.packs_checked, "bytes_read": self.bytes_read, "read_data": self.read_data,
                "seconds": round(self.seconds, 3), "damaged_objects": self.damaged_objects,
                "damaged_backups": self.damaged_backups}

    def summary(self) -> str:
        head = (f"checked {self.backups_checked} backups, {self.chunks_checked} chunks in {self.packs_checked} "
                f"packs ({self.bytes_read / 1e6:.1f} MB read) in {self.seconds:.1f} s")
        if self.ok:
            return head + ": no damage found"
        lines = [head + ": DAMAGE FOUND"]
        lines += [f"  damaged object {d['object']}: {d['error']}" for d in self.damaged_objects]
        for bid, reasons in sorted(self.damaged_backups.items()):
            lines.append(f"  damaged backup {bid}: {reasons[0]}" + (f" (+{len(reasons) - 1} more)"
                                                                    if len(reasons) > 1 else ""))
        return "\n".join(lines)


def verify_vault(vault: Vault, *, read_data: bool = True, threads: int | None = None,
                 progress: ProgressCallback | None = None) -> VerifyReport:
    with vault.locks.acquire(LockKind.SHARED, "verify"):
        # One whole pack (32 MiB) in memory per thread: one thread per core keeps RSS bounded.
        return _Verify(vault, read_data, threads or os.cpu_count() or 2, progress).run()


READ_PIECE = 4 << 20  # a pack is read in pieces of this size (one per thread in memory, not the pack)


class _Verify:
    def __init__(self, vault: Vault, read_data: bool, threads: int, progress: ProgressCallback | None) -> None:
        self.vault = vault
        self.read_data = read_data
        self.threads = threads
        self.callback = progress
        self.report = VerifyReport(read_data=read_data)
        self.bad_chunks: dict[bytes, str] = {}
        self.missing_packs: dict[str, list[bytes]] = {}  # pack key -> the wanted chunks it held
        self.lock = threading.Lock()

    def damaged(self, key: str, err: str) -> None:
        with self.lock:
            self.report.damaged_objects.append({"object": key, "error": err})

    def run(self) -> VerifyReport:
        start = time.monotonic()
        # Manifests before the index: a backup indexes its chunks before it writes its manifest, so
        # one that commits while we run cannot look as if its chunks were missing.
        # One table holds every referenced chunk and then its location (~58 bytes a chunk); which
        # backups use a chunk is worked out again only for damaged chunks (usually none).
        wanted = ChunkLocator()
        readable: list[BackupId] = []
        for bid in self.vault.backup_ids():
            self.report.backups_checked += 1
            try:
                manifest = self.vault.read_manifest(bid)
            except RakshaError as err:
                self._damaged_backup(str(bid), f"{err.code}: {err.message}")
                continue
            wanted.add_ids(manifest.iter_blob_ids())
            del manifest  # before the next is read: one manifest at a time (a terabyte disk's: ~65 MB)
            readable.append(bid)
            try:
                self.vault.read_metadata(bid)
            except RakshaError as err:  # its data is still checked: a restore does not need the metadata
                self._damaged_backup(str(bid), f"metadata: {err.code}: {err.message}")
        self._locate(wanted, report=True)
        for cid in wanted.unlocated():
            self.bad_chunks[cid] = f"chunk {cid.hex()} is missing (no index entry)"
        self._check(wanted)
        if self.missing_packs:
            self._recheck_moved()
        for key in sorted(self.missing_packs):
            self.damaged(key, "missing")
            for cid in self.missing_packs[key]:
                self.bad_chunks.setdefault(cid, f"chunk {cid.hex()} is missing: its pack {key} is gone")
        if self.bad_chunks:
            self._name_damaged_backups(readable)
        self.report.seconds = time.monotonic() - start
        return self.report

    def _name_damaged_backups(self, backups: list[BackupId]) -> None:
        """Each backup using a damaged chunk, with a reason per chunk (its manifest read again)."""
        for bid in backups:
            try:
                manifest = self.vault.read_manifest(bid)
            except NotFound:
                continue  # deleted since: nothing left to name
            except RakshaError as err:
                self._damaged_backup(str(bid), f"{err.code}: {err.message}")
                continue
            for cid in manifest.blob_ids():  # distinct: one reason per damaged chunk
                why = self.bad_chunks.get(cid)
                if why is not None:
                    self._damaged_backup(str(bid), why)
            del manifest

    def _damaged_backup(self, bid: str, why: str) -> None:
        self.report.damaged_backups.setdefault(bid, []).append(why)

    def _locate(self, wanted: ChunkLocator, *, report: bool) -> None:
        """Fill in the locations of ``wanted``, reading each index object on its own so that one damaged
        object is reported (``report``) and the others still count. An object whose bytes do not match
        its name is reported but still used if it decodes."""
        index = self.vault.load_index(locate=wanted, check_names=True)
        if report:  # once, from the listing that held
            for key, why in index.damaged.items():
                self.damaged(key, why)

    def _check(self, table: ChunkTable) -> None:
        # Row numbers grouped by pack, 4 bytes a chunk; a pack's list of Locations is made only while
        # it is read.
        by_pack, total = table.by_pack()
        if self.read_data:
            self._read_packs(table, by_pack, total)
        else:
            self._stat_packs(table, by_pack)

    def _stat_packs(self, table: ChunkTable, by_pack: dict[bytes, array[int]]) -> None:
        """Without reading data: every pack must exist and be long enough for the blobs it is said to hold."""
        sizes = {pid: size for pid, size, _mtime in self.vault.iter_packs()}
        for pack_id, rows in sorted(by_pack.items()):
            entries = table.entries(rows)
            key = pack_key(pack_id.hex())
            size = sizes.get(pack_id.hex())
            if size is None:
                try:
                    size = self.vault.backend.stat(key).size  # not listed yet: written since the listing
                except NotFound:
                    self.missing_packs[key] = [cid for cid, _ in entries]
                    continue
            for cid, loc in entries:
                if loc.offset + loc.stored_length > size - 4:
                    self._bad(cid, f"chunk {cid.hex()} in {key}: the pack is too short (truncated)")

    def _read_packs(self, table: ChunkTable, by_pack: dict[bytes, array[int]], total: int) -> None:
        meter = Progress("verify", total, self.callback)
        local = threading.local()

        def check(item: tuple[bytes, array[int]]) -> None:
            pack_id, rows = item
            entries = table.entries(rows)
            key = pack_key(pack_id.hex())
            dec = getattr(local, "d", None)
            if dec is None:
                dec = local.d = zstandard.ZstdDecompressor()

            def blob_checked(cid: bytes, loc: Location, blob: bytes | bytearray | memoryview) -> None:
                try:
                    decode_blob(bytes(blob), cid, loc.raw_length, self.vault.crypto, dec, what=f"{key}@{loc.offset}")
                except RakshaError as err:
                    self._bad(cid, f"chunk {cid.hex()} in {key}: {err.message}")
                with self.lock:
                    self.report.chunks_checked += 1
                meter.add(loc.stored_length)

            try:
                size = self._read_pack(key, sorted(entries, key=lambda e: e[1].offset), blob_checked)
            except NotFound:
                with self.lock:
                    self.missing_packs[key] = [cid for cid, _ in entries]
                return
            with self.lock:
                self.report.packs_checked += 1
                self.report.bytes_read += size

        run_parallel(sorted(by_pack.items()), check, self.threads)
        meter.finish()

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
        """Packs that vanished while we ran: a gc that repacked them has indexed their chunks elsewhere.

        Those chunks are checked where the index now puts them; only the rest are reported missing.
        """
        fresh = ChunkLocator()
        fresh.add_ids(c for cids in self.missing_packs.values() for c in cids)
        self._locate(fresh, report=False)
        moved = ChunkTable()
        for key, cids in list(self.missing_packs.items()):
            still = []
            for cid in cids:
                loc = fresh.get(cid)
                if loc is not None and pack_key(loc.pack_id.hex()) != key:
                    moved.add(cid, loc.pack_id, loc.offset, loc.stored_length, loc.raw_length)
                else:
                    still.append(cid)
            if still:
                self.missing_packs[key] = still
            else:
                del self.missing_packs[key]
        if moved:
            self._check(moved)

    def _bad(self, cid: bytes, why: str) -> None:
        with self.lock:
            self.bad_chunks.setdefault(cid, why)
