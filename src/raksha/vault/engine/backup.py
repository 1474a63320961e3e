"""Back up one disk into the vault: full, or incremental from a parent and its changed extents.

Plan first (which chunks to read, which ids to take from the parent), then
read, hash, deduplicate, compress, seal and pack in parallel. The manifest is
written last, so an interrupted backup leaves no backup, only packs that a
rerun deduplicates against (or that gc removes after its grace period).
"""

from __future__ import annotations

import itertools
import mmap
import os
import threading
import time
from collections.abc import Callable, Collection, Container, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from raksha.domain.errors import AlreadyExists, InvalidInput, RakshaError
from raksha.vault.engine.blobio import ChunkReader
from raksha.vault.engine.changes import ChangedExtents, ChunkFlags, ChunkSpans, chunks_touching
from raksha.vault.engine.layering import Choice, choose, room
from raksha.vault.engine.packer import Packer
from raksha.vault.engine.progress import Progress, ProgressCallback
from raksha.vault.engine.seen_ids import SeenIds
from raksha.vault.engine.workers import run_pipeline
from raksha.vault.format.blob import BlobEncoder
from raksha.vault.format.chunk_ids import ZERO_PIECE, ChunkIds, ids_in
from raksha.vault.format.chunk_table import IdSet
from raksha.vault.format.constants import ID_SIZE, ZERO_ID
from raksha.vault.format.deltas import Deltas, Layer, MergedDeltas, NewEntries, covered_ranges, live_layers
from raksha.vault.format.manifest import Manifest
from raksha.vault.format.naming import BackupId
from raksha.vault.format.sorted_ids import DiskIdSet
from raksha.vault.locks import Lock, LockKind
from raksha.vault.malloc import POOL
from raksha.vault.repository import MANIFEST_WHOLE, ChunkIndex, Vault
from raksha.vault.sources.base import DiskSource, Extent


@dataclass
class BackupStats:
    virtual_size: int = 0
    bytes_read: int = 0
    bytes_stored: int = 0  # sealed blob bytes added to the vault
    chunks_total: int = 0
    chunks_read: int = 0
    chunks_new: int = 0
    chunks_deduplicated: int = 0  # read, but already in the vault
    chunks_from_parent: int = 0  # not read: unchanged since the parent
    chunks_zero: int = 0
    chunks_patched: int = 0  # changed in part: only the changed bytes read, the rest from the parent's chunk
    chunks_delta: int = 0  # changed in part: only the changed bytes read and stored, as a layer on the parent's
    chunks_merged: int = 0  # of those, chunks whose parent's layers were merged with the change into one layer
    packs_written: int = 0
    seconds: float = 0.0


@dataclass
class BackupResult:
    id: BackupId
    kind: str
    parent: BackupId | None
    stats: BackupStats
    content_digest: str

    def to_dict(self) -> dict[str, Any]:
        s = self.stats
        mb_s = s.bytes_read / s.seconds / 1e6 if s.seconds else 0.0
        return {"id": str(self.id), "kind": self.kind, "parent": str(self.parent) if self.parent else None,
                "content_digest": self.content_digest, **asdict(s), "read_mb_s": round(mb_s, 1)}


@dataclass
class Preread:
    """What a run's backups read of the vault before any disk can be read (ADR 0026): the chunk ids stored,
    from one scan of the index for all the run's disks, and the parents' manifests. Read under the run's
    shared lock while the VMs are frozen and their jobs start, not after. The ids are shared; each
    manifest goes to the backup of its disk, whose ids it becomes. ``close`` once the run's backups end."""

    vault: Vault
    stored: ChunkIndex  # every stored chunk id, no locations
    parents: dict[BackupId, Manifest]
    index_keys: set[str]  # the index objects listed before ``stored`` was read

    def stored_now(self) -> Container[bytes]:
        """Every chunk id stored: those read ahead, and those of index objects written since."""
        assert self.stored.ids is not None
        keys = [k for k in self.vault.index_keys() if k not in self.index_keys]
        return _Either(self.stored.ids, self.vault.ids_in_index(keys)) if keys else self.stored.ids

    def has(self, backup_id: BackupId) -> bool:
        """Whether this backup's manifest was read (a missing or unreadable one is looked for again)."""
        return backup_id in self.parents

    def take_parent(self, backup_id: BackupId) -> Manifest | None:
        return self.parents.pop(backup_id, None)

    def close(self) -> None:
        self.stored.close()


# What a run reads ahead of its parents' manifests: small ones (a large dense disk's is read by its own backup,
# a piece at a time), as many as the first transfers need, a few at once (a round trip each on an object store).
READ_AHEAD_MANIFESTS = 16
READ_AHEAD_BYTES = 16 << 20
READ_AHEAD_THREADS = 8


def preread(vault: Vault, parents: Mapping[BackupId, int], lock: Lock) -> Preread | None:
    """The run's :class:`Preread`, under ``lock`` (a held shared lock of ``vault``: a gc that condemned chunks
    before has published them, one after waits). ``parents``: the parents' backups, in the order their disks
    will be backed up, with the size of each one's manifest object; those past READ_AHEAD_MANIFESTS or
    READ_AHEAD_BYTES, or larger than MANIFEST_WHOLE, are left to their backups (so are those that cannot be
    read: the backup says what is wrong). None when the index cannot be read: each backup then reads what
    it needs itself."""
    if not lock.held_in(vault.locks, LockKind.SHARED):
        raise InvalidInput(f"reading ahead needs a held shared lock of the vault, not {lock!r}", code="LOCK_NOT_HELD")
    try:
        keys = vault.index_keys()
        stored = vault.load_index(tolerant=True, only=IdSet(), ids=True)
    except RakshaError:
        return None
    chosen: list[BackupId] = []
    budget = READ_AHEAD_BYTES
    for backup_id, size in parents.items():
        if size > MANIFEST_WHOLE:
            continue
        if len(chosen) == READ_AHEAD_MANIFESTS or size > budget:
            break
        chosen.append(backup_id)
        budget -= size

    def read(backup_id: BackupId) -> Manifest | None:
        try:
            return vault.read_manifest(backup_id)
        except RakshaError:
            return None

    if len(chosen) > 1:
        with ThreadPoolExecutor(min(READ_AHEAD_THREADS, len(chosen)), thread_name_prefix="raksha-read-ahead") as pool:
            read_ones = list(pool.map(read, chosen))
    else:
        read_ones = [read(b) for b in chosen]
    manifests = {b: m for b, m in zip(chosen, read_ones, strict=True) if m is not None}
    return Preread(vault, stored, manifests, keys)


class _Either(Container[bytes]):
    """In one set of chunk ids or the other."""

    def __init__(self, a: Container[bytes], b: Container[bytes]) -> None:
        self._a, self._b = a, b

    def __contains__(self, cid: object) -> bool:
        return cid in self._a or cid in self._b

    def missing_of(self, ids: Iterable[bytes]) -> set[bytes]:
        return _missing(self._b, _missing(self._a, ids))


def _missing(stored: Container[bytes], ids: Iterable[bytes]) -> set[bytes]:
    """Those of ``ids`` not in ``stored``: all at once where it can (``IdSet.missing_of``)."""
    missing_of: Callable[[Iterable[bytes]], set[bytes]] | None = getattr(stored, "missing_of", None)
    return missing_of(ids) if missing_of is not None else {cid for cid in ids if cid not in stored}


def _keep_none(_index: int) -> bool:
    return False


def default_threads() -> int:
    """Two per core, half reading the source and half computing (engine/workers.py, run_pipeline)."""
    return 2 * max(1, os.cpu_count() or 1)


# Chunks read ahead of the workers: this many bytes of buffers, and at least one per thread (big chunks).
PREFETCH_BYTES = 16 << 20
# Source bytes the readers keep asked for at once: an incremental's reads of ~100 kB each wait on the
# device's (or QEMU's) latency, one at a time per reader. 200 such reads took 95-100 ms from 1 reader, 72-78
# from 2 and 58-61 from 8; whole chunks keep the 2 readers that measured best for a full.
READ_DEPTH_BYTES = 2 << 20
MAX_READERS = 8


def merge_source_budget(changed_bytes: int, chunk_size: int) -> int:
    """Source bytes beyond the change that merges may read instead of the parent's layers: a merge's
    ranges lie around the change on the disk, where the layers lie in as many packs of the vault (171
    merges read 596 small blobs, 0.42-0.56 s of a run). Up to a tenth of the change and a chunk, so an
    incremental still reads at most 1.1 x what changed and a chunk of the disk; past that, the vault."""
    return changed_bytes // 10 + chunk_size


def reader_count(threads: int, reads: int, read_bytes: int, *, limit: int = MAX_READERS) -> int:
    """Reader threads for ``reads`` source reads of ``read_bytes`` in all: half the threads, or more when
    the reads are small, so that about READ_DEPTH_BYTES are in flight (at most ``limit``: a caller that
    sets the threads sets how hard the VM's storage is read, and gets at most that many readers)."""
    base = max(1, threads // 2)
    if reads == 0 or read_bytes == 0:
        return base
    return max(base, min(limit, -(-READ_DEPTH_BYTES * reads // read_bytes)))


@dataclass(frozen=True)
class _Filled:
    length: int  # bytes of data in the buffer: the chunk, or a new layer's ranges
    read: int  # of the source
    patched: bool = False  # the chunk was rebuilt on the parent's copy
    layer: bool = False  # the buffer holds a new layer, not the chunk
    merged: bool = False  # that layer replaces the parent's layers (their ranges and the change's)
    ranges: tuple[tuple[int, int], ...] = ()  # a layer's ranges in the chunk, found once by the reader


def backup_disk(
    vault: Vault,
    source: DiskSource,
    backup_id: BackupId,
    *,
    parent: BackupId | None = None,
    changed_extents: Sequence[Extent] | None = None,
    threads: int | None = None,
    progress: ProgressCallback | None = None,
    hints: dict[str, str] | None = None,
    reads_done: Callable[[], None] | None = None,
    lock: Lock | None = None,
    read_ahead: Preread | None = None,
) -> BackupResult:
    """Back ``source`` up as ``backup_id``: whole, or with ``parent`` and ``changed_extents`` only what
    changed. ``reads_done`` is called once the source will not be read again, while the last chunks are
    stored and before the backup is committed: a live VM's backup job can end meanwhile.

    ``lock``: a shared vault lock the caller holds for this backup and others (a group's run takes one for
    all its disks, beside its point in time); without one, the backup takes its own. ``read_ahead``: what the
    caller read of the vault under that lock before the source was ready (``preread``)."""
    if changed_extents is not None and parent is None:
        raise InvalidInput("changed extents need a parent backup to apply to", code="PARENT_REQUIRED")
    if vault.has_backup(backup_id):
        raise AlreadyExists(f"backup {backup_id} already exists", code="BACKUP_EXISTS")
    backup = _Backup(vault, source, backup_id, parent, changed_extents, threads, progress, hints, reads_done,
                     read_ahead)
    if read_ahead is not None and (lock is None or read_ahead.vault is not vault):
        raise InvalidInput(f"backup {backup_id}: what was read ahead must be of its vault, under the lock given",
                           code="LOCK_NOT_HELD")
    if lock is not None:
        if not lock.held_in(vault.locks, LockKind.SHARED):
            raise InvalidInput(f"backup {backup_id} needs a held shared lock of its vault, not {lock!r}",
                               code="LOCK_NOT_HELD")
        return backup.run()
    with vault.locks.acquire(LockKind.SHARED, f"backup {backup_id}"):
        return backup.run()


class _Backup:
    def __init__(
        self,
        vault: Vault,
        source: DiskSource,
        backup_id: BackupId,
        parent: BackupId | None,
        changed_extents: Sequence[Extent] | None,
        threads: int | None,
        progress: ProgressCallback | None,
        hints: dict[str, str] | None,
        reads_done: Callable[[], None] | None = None,
        read_ahead: Preread | None = None,
    ) -> None:
        self.vault = vault
        self.read_ahead = read_ahead
        self.reads_done = reads_done
        self.source = source
        self.id = backup_id
        self.parent_id = parent
        self.threads = threads or default_threads()
        self.max_readers = MAX_READERS if threads is None else self.threads
        self.callback = progress
        self.hints = hints or {}
        self.chunk_size = vault.config.chunk_size
        self.size = source.virtual_size
        self.changed = None if changed_extents is None else ChangedExtents(changed_extents, self.chunk_size, self.size)
        self.stats = BackupStats(virtual_size=self.size)
        self._lock = threading.Lock()
        self._local = threading.local()  # per thread: a BlobEncoder, a BlobDecoder
        self._encoders: list[BlobEncoder] = []  # all of them, to release once the pipeline ends
        self._zero_ids: dict[int, bytes] = {}
        self.condemned: IdSet | DiskIdSet = IdSet()  # what a running gc will delete: stored again if used
        # Chunks changed in part: rebuilt whole on the parent's copy (patch), or stored as a new layer of
        # just the changed ranges (delta), or of those and the parent's layers' (delta and merge). Their
        # ranges come from ``self.changed`` (and the parent's manifest).
        self._clear_choices(-(-self.size // self.chunk_size))
        # The new manifest's layers: the parent's on chunks this backup keeps, and this backup's own
        # (encoded: a large disk may carry layers on hundreds of thousands of chunks).
        self.kept_deltas = Deltas()
        self.keep_delta: Callable[[int], bool] = _keep_none
        self.new_deltas = NewEntries()
        self._started = datetime.now(UTC)

    def run(self) -> BackupResult:
        start = time.monotonic()
        # The lock is held before the index is read: a gc that condemned chunks earlier
        # has published them, and a later gc waits for us (format.md §11).
        # An unreadable index only hides chunks: they are stored again, never referenced unseen.
        # Every stored id, to deduplicate against; locations only of the parent's chunks that changes
        # will rebuild or layer (the index is the largest structure in memory).
        ahead = self.read_ahead
        if ahead is None:
            self.parent = self._read_parent()
            index = self.vault.load_index(tolerant=True, only=self._parent_blobs_to_read(), ids=True)
            assert index.ids is not None
            stored: Container[bytes] = index.ids
        else:
            # The ids were read ahead; those of index objects written since (this run's other disks' packs)
            # now, so that identical chunks across its disks are still stored once; the locations of the
            # parent's blobs a change rebuilds on, if any, now too.
            self.parent = self._read_parent(ahead.take_parent(self.parent_id) if self.parent_id else None)
            wanted = self._parent_blobs_to_read()
            index = self.vault.load_index(tolerant=True, only=wanted) if wanted else ChunkIndex()
            stored = ahead.stored_now()
        try:
            return self._run(start, index, stored)
        finally:
            index.close()  # a large vault's ids are in a temporary file (those read ahead are the caller's)
            if isinstance(self.condemned, DiskIdSet):
                self.condemned.close()  # so are a large prune's condemned ids

    def _run(self, start: float, index: ChunkIndex, stored: Container[bytes]) -> BackupResult:
        condemned = self.vault.condemned_chunks()
        self.stored_ids, self.condemned = stored, condemned
        # Each blob read as it is: a chunk's base and layers lie in as many packs, so a piece of one read
        # ahead was gone before the next chunk (merges of ~170 chunks: 0.41-0.46 s against 0.50-0.51 s).
        self._chunks = ChunkReader(self.vault, index.locations, self.chunk_size, read_ahead=0)
        n = -(-self.size // self.chunk_size)
        to_read = self._plan(n)  # sets self.ids: zero, or the parent's (no copy: 32 MB for 1 TiB)
        self.stats.chunks_total = n
        self.stats.chunks_zero = n - len(to_read) - self.stats.chunks_from_parent
        self.added = SeenIds(len(to_read))  # what this backup stores: in the same memory on any disk
        self.packer = Packer(self.vault)
        work = sum(self._work(i) for i in to_read)
        self.progress = Progress("backup", work, self.callback)
        workers = max(1, self.threads - max(1, self.threads // 2))
        readers = reader_count(self.threads, len(to_read), work, limit=self.max_readers)
        buffers = [POOL.take(self.chunk_size)  # page-aligned: sources read into them with O_DIRECT
                   for _ in range(max(readers + workers, PREFETCH_BYTES // self.chunk_size))]
        try:
            try:
                run_pipeline(to_read, self._fill, self._digest, buffers, readers=readers, workers=workers,
                             all_filled=self.reads_done)
            finally:  # every reader and worker has ended: their buffers go to the next backup of the process
                POOL.give(*buffers)
                for encoder in self._encoders:
                    encoder.release()
            self.packer.flush()
        except BaseException:
            self.packer.abort()
            raise
        finally:
            self.added.close()
        self.progress.finish()
        self.stats.packs_written = self.packer.packs_written
        self.stats.seconds = time.monotonic() - start
        return self._commit()

    def _length(self, i: int) -> int:
        return min(self.chunk_size, self.size - i * self.chunk_size)

    def _work(self, i: int) -> int:
        """Bytes chunk ``i`` costs to back up: what progress counts."""
        if i in self.delta:
            return sum(n for _, n in self._layer_ranges(i))
        return self._length(i)

    def _layer_ranges(self, i: int) -> Sequence[tuple[int, int]]:
        """The ranges of the layer chunk ``i`` gets: the change's, or merged with the parent's layers'."""
        assert self.changed is not None
        if i in self.merge:
            return covered_ranges(self._live(i), self.changed.ranges(i))
        return self.changed.ranges(i)

    def _live(self, i: int) -> list[Layer]:
        """The parent's layers on chunk ``i`` that this change does not overwrite entirely (with the
        layers above them): the same blocks written again leave one layer, read from nowhere."""
        assert self.parent is not None and self.changed is not None
        return live_layers(self.parent.deltas.get(i, []), self.changed.ranges(i))

    def _read_parent(self, read: Manifest | None = None) -> Manifest | None:
        """The parent's manifest: as read ahead (``read``), else from the vault."""
        if self.parent_id is None:
            return None
        parent = read if read is not None else self.vault.read_manifest(self.parent_id)
        if parent.chunk_size != self.chunk_size:
            raise InvalidInput(f"parent {self.parent_id} has another chunk size", code="PARENT_MISMATCH")
        return parent

    def _parent_blobs_to_read(self) -> IdSet:
        """The blobs of the parent's chunks that changes may rebuild on the parent's copy (``_patched``
        below): all this backup reads of the parent, so the only locations it loads. A new layer reads
        nothing of its base. Which chunks are rebuilt is only final once the index says which parent
        chunks are still stored; a chunk that turns out not to be can only become a layer or be read whole."""
        out = IdSet()
        parent, changed = self.parent, self.changed
        if parent is None or changed is None:
            return out
        n = -(-self.size // self.chunk_size)
        must = changed.chunks()
        self._classify(must, n, min(n, parent.chunk_count), set())
        for i in must:
            if i in self.patch:
                out.add(parent.chunk_ids[i])
                out.update(layer.blob_id for layer in parent.deltas.get(i, []))
            elif i in self.merge and i not in self.merge_source:  # the parent's live layers, not its base
                out.update(layer.blob_id for layer in self._live(i))
        return out

    def _clear_choices(self, n: int) -> None:
        """No chunk of the ``n`` chosen yet to be rebuilt, layered or merged (``_classify`` chooses)."""
        self.patch, self.delta, self.merge = ChunkFlags(n), ChunkFlags(n), ChunkFlags(n)
        self.merge_source = ChunkFlags(n)  # merges whose ranges are all read from the source, not the vault

    def _classify(self, must: ChunkSpans, n: int, common: int, bad: set[int]) -> None:
        """Sort the chunks changed in part into layers (``self.delta``, of which ``self.merge`` replace
        the parent's) and rebuilds (``self.patch``), by the writer's policy (engine/layering.py). Chunks
        that keep the parent's layers, plus those layered now, stay within its share."""
        parent, changed = self.parent, self.changed
        assert parent is not None and changed is not None
        room_left = room(n, sum(1 for i in parent.deltas.indexes(0, n) if i not in must))
        extra_left = merge_source_budget(changed.bytes, self.chunk_size)
        for i in must:
            if i >= common or i in bad:
                continue
            ranges = changed.ranges(i)
            if sum(r[1] for r in ranges) >= self._length(i):
                continue  # changed whole: read whole
            choice = choose(parent.deltas.get(i, []), ranges, self._length(i), room_left)
            if choice is Choice.REBUILD:
                self.patch.add(i)
                continue
            self.delta.add(i)
            if choice is Choice.MERGE:
                self.merge.add(i)
                extra = sum(r[1] for r in covered_ranges(self._live(i), ranges)) - sum(r[1] for r in ranges)
                if extra <= extra_left:
                    self.merge_source.add(i)
                    extra_left -= extra
            room_left -= 1

    def _plan(self, n: int) -> Collection[int]:
        """Chunks to read; ids of the others are set here (zero, or the parent's)."""
        parent, changed = self.parent, self.changed
        if parent is None or changed is None:  # a full, or no change tracking: read all that holds data
            self.ids = ChunkIds.zeros(n)
            return self._with_data()
        must = changed.chunks()
        common = min(n, parent.chunk_count)
        # Chunks the parent cannot supply (format.md §8: same span, and everything it is made of stored
        # or zero); every chunk past its end neither.
        bad = self._not_reusable(n, common)
        if any(i in must for i in bad):  # else ``_parent_blobs_to_read`` sorted them as this would
            self._clear_choices(n)
            self._classify(must, n, common, bad)
        # Every other chunk is the parent's, unless it cannot be. The parent's ids become ours (no copy: a
        # 1 TiB disk's ids are 32 MB); a changed chunk keeps its parent's id until it is read, as what a
        # rebuild or a new layer starts from.
        self.ids = parent.chunk_ids if n == parent.chunk_count else parent.chunk_ids.resized(n)
        parent.chunk_ids = ChunkIds()
        for i in bad:
            self.ids[i] = ZERO_ID  # read below: zero unless the read finds data

        def kept(i: int) -> bool:
            return i < common and i not in must and i not in bad

        self.kept_deltas, self.keep_delta = parent.deltas, kept
        touched = sum(1 for i in must if i < common and i not in bad and self.ids[i] != ZERO_ID)
        self.stats.chunks_from_parent = (n - self.ids.count(ZERO_ID) - touched + sum(
            1 for i in parent.deltas.indexes(0, common) if kept(i) and self.ids[i] == ZERO_ID))
        if not bad and common == n:
            return must
        # Beyond the parent's end, or a chunk it cannot supply: read it if it may hold data.
        data = self._with_data()
        return must.union(i for i in bad if i in data).merged(data.clipped(common, n))

    def _not_reusable(self, n: int, common: int) -> set[int]:
        """Chunks below ``common`` the parent cannot supply: of another length (only a last chunk can be
        short), or made of a blob that is not stored (missing from the index, or condemned by gc)."""
        parent = self.parent
        assert parent is not None
        bad = {i for i in {common - 1, n - 1} if 0 <= i < common and parent.chunk_length(i) != self._length(i)}
        stored, condemned = self.stored_ids, self.condemned
        # No gc running (nearly always): one lookup an id, not two; this walks every chunk of the disk.
        none_condemned = isinstance(condemned, IdSet) and not len(condemned)

        def gone(cids: set[bytes]) -> set[bytes]:
            """Those of ``cids`` not stored, or condemned: looked up all at once."""
            cids.discard(ZERO_ID)
            out = _missing(stored, cids)
            if not none_condemned:
                out.update(cid for cid in cids - out if cid in condemned)
            return out

        # One pass over the ids a piece (2048) at a time, as they are (from their file on a large disk): no set
        # of them all, which for a dense disk would take ~58 bytes an id. Each distinct id of a piece is looked
        # up once, and a piece of holes not at all: a sparse 1 TiB disk's million ids took 126 ms, one by one.
        start = 0
        for piece in parent.chunk_ids.pieces(0, common):
            count = len(piece) // ID_SIZE
            if piece != ZERO_PIECE[: len(piece)]:
                ids = list(ids_in(piece))
                missing = gone(set(ids))
                if missing:
                    bad.update(i for i, cid in enumerate(ids, start) if cid in missing)
            start += count
        # The layers likewise, 2048 chunks' at a time: half of a large disk's chunks may carry layers.
        layered = ((i, layers) for i, layers in parent.deltas.items() if i < common)
        while batch := list(itertools.islice(layered, len(ZERO_PIECE) // ID_SIZE)):
            missing = gone({layer.blob_id for _, layers in batch for layer in layers})
            if missing:
                bad.update(i for i, layers in batch if any(layer.blob_id in missing for layer in layers))
        return bad

    def _is_zero(self, cid: bytes, data: memoryview) -> bool:
        """Whether ``data`` (of id ``cid``) is all zero. Data whose first or last byte is not says so at
        once; else its id is compared with the zero id of its length. A layer's length is its change's,
        so an incremental's layers would otherwise hash as many zero buffers as they have lengths."""
        n = len(data)
        if n and (data[0] or data[n - 1]):
            return False
        return cid == self._zero_id(n)

    def _zero_id(self, length: int) -> bytes:
        """The chunk id all-zero data of ``length`` bytes would have: a chunk whose id equals it is all
        zero (as surely as ids identify chunks at all), found without comparing a single byte."""
        cid = self._zero_ids.get(length)
        if cid is None:
            cid = self._zero_ids[length] = self.vault.crypto.chunk_id(bytes(length))
        return cid

    def _read(self, offset: int, out: memoryview) -> None:
        readinto = getattr(self.source, "readinto", None)
        if readinto is not None:
            readinto(offset, out)
        else:
            out[:] = self.source.pread(offset, len(out))

    def _with_data(self) -> ChunkSpans:
        # Whole chunks are read even where part of one is a hole: O_DIRECT reads of holes cost the
        # device nothing, and one 1 MiB read is cheaper than several small ones (measured: slower).
        return chunks_touching(self.source.data_extents(), self.chunk_size, self.size)

    def _on_parent(self, i: int, out: memoryview, *, whole: bool) -> int | None:
        """Fill ``out`` with the parent's chunk (``whole``), or only with its live layers' ranges (a merge:
        the base is never needed), then the changed ranges read from the source over it: the bytes read,
        or None if the parent's copy fails."""
        assert self.parent is not None and self.changed is not None
        what = f"parent {self.parent_id} chunk {i}"
        try:
            if whole:
                self._chunks.layered_into(self.ids[i], self.parent.deltas.get(i, []), out, what=what)
            else:
                self._chunks.layers_into(self._live(i), out, what=what)
        except RakshaError:
            return None  # damaged or gone: read the whole chunk from the source instead
        read = 0
        for off, n in self.changed.ranges(i):
            self._read(i * self.chunk_size + off, out[off : off + n])
            read += n
        return read

    def _read_ranges(self, i: int, ranges: Sequence[tuple[int, int]], buf: mmap.mmap, *, merged: bool) -> _Filled:
        """A new layer of chunk ``i``: its ``ranges`` read from the source one after another."""
        length = sum(n for _, n in ranges)
        data = memoryview(buf)[:length]
        pos = 0
        for off, n in ranges:
            self._read(i * self.chunk_size + off, data[pos : pos + n])
            pos += n
        return _Filled(length, length, layer=True, merged=merged, ranges=tuple(ranges))

    def _fill(self, i: int, buf: mmap.mmap) -> _Filled:
        """The I/O of chunk ``i`` (in a reader thread): its changed ranges one after another for a new
        layer; for a merge every range it covers, from the source within ``merge_source_budget``, else
        the parent's layers' from the vault and the change's from the source; otherwise the whole chunk
        (rebuilt on the parent's copy where it changed in part)."""
        if i in self.merge_source:
            return self._read_ranges(i, self._layer_ranges(i), buf, merged=True)
        if i in self.merge:
            out = memoryview(buf)[: self._length(i)]
            read = self._on_parent(i, out, whole=False)
            if read is not None:  # every range the layer covers, moved to the front in order
                pos = 0
                ranges = tuple(self._layer_ranges(i))
                for off, n in ranges:
                    out[pos : pos + n] = out[off : off + n]  # pos <= off: memoryview moves overlaps safely
                    pos += n
                return _Filled(pos, read, layer=True, merged=True, ranges=ranges)
        elif i in self.delta:
            assert self.changed is not None
            return self._read_ranges(i, self.changed.ranges(i), buf, merged=False)
        length = self._length(i)
        data = memoryview(buf)[:length]
        read = self._on_parent(i, data, whole=True) if i in self.patch else None
        if read is not None:
            return _Filled(length, read, patched=True)
        self._read(i * self.chunk_size, data)
        return _Filled(length, length)

    def _digest(self, i: int, buf: mmap.mmap, filled: _Filled) -> None:
        """The computing of chunk ``i`` (in a worker thread): hash, then store unless zero or stored."""
        data = memoryview(buf)[: filled.length]
        with self._lock:
            self.stats.bytes_read += filled.read
            self.stats.chunks_read += 1
            self.stats.chunks_patched += filled.patched
            self.stats.chunks_delta += filled.layer
            self.stats.chunks_merged += filled.merged
        cid = self.vault.crypto.chunk_id(data)
        zero = self._is_zero(cid, data)
        if filled.layer:
            self._layer(i, ZERO_ID if zero else cid, data, filled)
        elif zero:
            self.ids[i] = ZERO_ID  # a changed chunk had its parent's id until now
            with self._lock:
                self.stats.chunks_zero += 1
        else:
            self.ids[i] = cid
            self._store(cid, data)
        # As planned, also when a merge fell back to reading the chunk (a layer's work is its ranges).
        self.progress.add(filled.length if filled.layer else self._work(i))

    def _layer(self, i: int, cid: bytes, data: memoryview, filled: _Filled) -> None:
        """Chunk ``i`` becomes the parent's copy with one more layer, ``data`` (the changed ranges), or with
        ``data`` in place of its layers (the ranges they and the change cover)."""
        if cid != ZERO_ID:  # a layer of zeros is stored as nothing
            self._store(cid, data)
        # On the parent's copy: its id (kept in ``self.ids``) and its layers this one leaves visible, then it.
        below = [] if filled.merged else self._live(i)
        layers = [*below, Layer(cid, filled.ranges)]
        with self._lock:
            self.new_deltas.add(i, layers)

    def _store(self, cid: bytes, data: memoryview) -> None:
        """Pack ``data`` under ``cid`` unless the vault (or this backup) has it already."""
        with self._lock:
            # Stored in the vault (and not condemned by a gc), or by this backup already.
            new = not (cid in self.stored_ids and cid not in self.condemned) and self.added.add(cid)
            if new:
                self.stats.chunks_new += 1
            else:
                self.stats.chunks_deduplicated += 1
        if not new:
            return
        encoder = getattr(self._local, "encoder", None)
        if encoder is None:  # zstandard objects are not thread-safe, and the buffers are reused: one per thread
            encoder = self._local.encoder = BlobEncoder(
                self.vault.crypto, self.vault.config.compression_level, self.chunk_size)
            with self._lock:
                self._encoders.append(encoder)
        blob = encoder.encode(data, cid)
        self.packer.add(cid, blob, len(data))
        with self._lock:
            self.stats.bytes_stored += len(blob)

    def _commit(self) -> BackupResult:
        fmt = "%Y-%m-%dT%H:%M:%S.%fZ"
        created, now = self._started.strftime(fmt), datetime.now(UTC).strftime(fmt)
        manifest = Manifest(
            id=self.id,
            virtual_size=self.size,
            chunk_size=self.chunk_size,
            chunk_ids=self.ids,
            source_format=self.source.format,
            created=created,
            parent=str(self.parent_id) if self.parent_id else None,
            deltas=MergedDeltas(self.kept_deltas, self.keep_delta, self.new_deltas),
        )
        kind = "incremental" if self.changed is not None else "full"
        digest = manifest.content_digest()
        metadata = {
            "created": created,
            "completed": now,
            "parent": manifest.parent,
            "kind": kind,
            "source": {"path": self.source.path, "format": self.source.format, "virtual_size": self.size},
            "changed_extents": (
                {"count": self.changed.count, "bytes": self.changed.bytes}
                if self.changed is not None else None
            ),
            "stats": asdict(self.stats),
            "checksums": {"content_digest": digest},
            "hints": self.hints,
        }
        self.vault.write_backup(manifest, metadata)
        return BackupResult(self.id, kind, self.parent_id, self.stats, digest)
