"""Back up one disk into the vault: full, or incremental from a parent and its changed extents.

Plan first (which chunks to read, which ids to take from the parent), then
read, hash, deduplicate, compress, seal and pack in parallel. The manifest is
written last, so an interrupted backup leaves no backup, only packs that a
rerun deduplicates against (or that gc removes after its grace period).
"""

from __future__ import annotations

import bisect
import mmap
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from raksha.domain.errors import AlreadyExists, InvalidInput, RakshaError
from raksha.vault.engine.blobio import ChunkReader
from raksha.vault.engine.packer import Packer
from raksha.vault.engine.progress import Progress, ProgressCallback
from raksha.vault.engine.seen_ids import SeenIds
from raksha.vault.engine.workers import run_pipeline
from raksha.vault.format.blob import BlobEncoder
from raksha.vault.format.chunk_ids import ChunkIds
from raksha.vault.format.chunk_table import IdSet
from raksha.vault.format.constants import ZERO_ID
from raksha.vault.format.deltas import Deltas, Layer, encode_layers
from raksha.vault.format.manifest import Manifest
from raksha.vault.format.naming import BackupId
from raksha.vault.locks import LockKind
from raksha.vault.repository import ChunkIndex, Vault
from raksha.vault.sources.base import DiskSource, Extent, merge_extents


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


# A changed chunk becomes a delta layer on its parent's copy while it would have at most this many
# layers covering at most half of it (format.md §8.1): a restore then reads at most 5 blobs and 1.5
# chunks of bytes for it. Past that, the whole chunk is rebuilt and stored. Each layer lists at most
# MAX_RANGES ranges, and at most half of a disk's chunks (or MIN_LAYERED_ROOM) carry layers, so a
# manifest and the memory it takes stay bounded by the disk's size whatever the history of writes.
MAX_LAYERS = 4
MAX_LAYERED_FRACTION = 2  # layers cover at most 1/2 of the chunk
MAX_RANGES = 64
MAX_LAYERED_SHARE = 2  # at most 1/2 of the chunks carry layers
MIN_LAYERED_ROOM = 64


def _keep_none(_index: int) -> bool:
    return False


def default_threads() -> int:
    """Two per core, half reading the source and half computing (engine/workers.py, run_pipeline)."""
    return 2 * max(1, os.cpu_count() or 1)


# Chunks read ahead of the workers: this many bytes of buffers, and at least one per thread (big chunks).
PREFETCH_BYTES = 16 << 20


@dataclass(frozen=True)
class _Filled:
    length: int  # bytes of data in the buffer: the chunk, or a new layer's changed ranges
    read: int  # of the source
    patched: bool  # the chunk was rebuilt on the parent's copy


class ChunkSpans:
    """Indexes of chunks, ascending, held as (first, last) spans: 16 bytes a span instead of 8 a chunk
    (a dense 16 TiB disk's 16 million chunks are one span). Iterable again and again; ``len`` and ``in``
    without iterating."""

    def __init__(self, spans: list[tuple[int, int]]) -> None:
        self._spans = spans
        self._firsts = [a for a, _ in spans]
        self._len = sum(b - a + 1 for a, b in spans)

    def __iter__(self) -> Iterator[int]:
        for first, last in self._spans:
            yield from range(first, last + 1)

    def __len__(self) -> int:
        return self._len

    def __contains__(self, i: object) -> bool:
        if not isinstance(i, int):
            return False
        k = bisect.bisect_right(self._firsts, i) - 1
        return k >= 0 and i <= self._spans[k][1]


def chunks_touching(extents: list[Extent], chunk_size: int, virtual_size: int) -> ChunkSpans:
    """Indexes of the chunks that ``extents`` overlap, ascending, clipped to the disk."""
    spans: list[tuple[int, int]] = []
    for off, length in merge_extents(extents):
        end = min(off + length, virtual_size)
        if end <= off:
            continue
        first, last = off // chunk_size, (end - 1) // chunk_size
        if spans and first <= spans[-1][1] + 1:
            if last > spans[-1][1]:
                spans[-1] = (spans[-1][0], last)
            continue
        spans.append((first, last))
    return ChunkSpans(spans)


def split_by_chunk(extents: list[Extent], chunk_size: int, virtual_size: int) -> dict[int, list[Extent]]:
    """Each chunk's changed ranges, relative to the chunk's start."""
    out: dict[int, list[Extent]] = {}
    for off, length in merge_extents(extents):
        end = min(off + length, virtual_size)
        while off < end:
            i = off // chunk_size
            stop = min((i + 1) * chunk_size, end)
            out.setdefault(i, []).append((off - i * chunk_size, stop - off))
            off = stop
    return out


def backup_disk(
    vault: Vault,
    source: DiskSource,
    backup_id: BackupId,
    *,
    parent: BackupId | None = None,
    changed_extents: list[Extent] | None = None,
    threads: int | None = None,
    progress: ProgressCallback | None = None,
    hints: dict[str, str] | None = None,
) -> BackupResult:
    if changed_extents is not None and parent is None:
        raise InvalidInput("changed extents need a parent backup to apply to", code="PARENT_REQUIRED")
    if vault.has_backup(backup_id):
        raise AlreadyExists(f"backup {backup_id} already exists", code="BACKUP_EXISTS")
    with vault.locks.acquire(LockKind.SHARED, f"backup {backup_id}"):
        return _Backup(vault, source, backup_id, parent, changed_extents, threads, progress, hints).run()


class _Backup:
    def __init__(
        self,
        vault: Vault,
        source: DiskSource,
        backup_id: BackupId,
        parent: BackupId | None,
        changed_extents: list[Extent] | None,
        threads: int | None,
        progress: ProgressCallback | None,
        hints: dict[str, str] | None,
    ) -> None:
        self.vault = vault
        self.source = source
        self.id = backup_id
        self.parent_id = parent
        self.changed = changed_extents
        self.threads = threads or default_threads()
        self.callback = progress
        self.hints = hints or {}
        self.chunk_size = vault.config.chunk_size
        self.size = source.virtual_size
        self.stats = BackupStats(virtual_size=self.size)
        self._lock = threading.Lock()
        self._local = threading.local()  # per thread: a BlobEncoder, a BlobDecoder
        self._zero_ids: dict[int, bytes] = {}
        self.patch: dict[int, list[Extent]] = {}  # changed in part, rebuilt whole: the changed ranges
        self.delta: dict[int, list[Extent]] = {}  # changed in part, stored as a new layer: the changed ranges
        # The new manifest's layers: the parent's on chunks this backup keeps, and this backup's own
        # (encoded: a large disk may carry layers on hundreds of thousands of chunks).
        self.kept_deltas = Deltas()
        self.keep_delta: Callable[[int], bool] = _keep_none
        self.new_deltas: dict[int, bytes] = {}
        self._started = datetime.now(UTC)

    def run(self) -> BackupResult:
        start = time.monotonic()
        # The lock is held before the index is read: a gc that condemned chunks earlier
        # has published them, and a later gc waits for us (format.md §11).
        # An unreadable index only hides chunks: they are stored again, never referenced unseen.
        # Every stored id, to deduplicate against; locations only of the parent's chunks that changes
        # will rebuild or layer (the index is the largest structure in memory).
        self.parent = self._read_parent()
        index = self.vault.load_index(tolerant=True, only=self._parent_blobs_to_read(), ids=True)
        try:
            return self._run(start, index)
        finally:
            index.close()  # a large vault's ids are in a temporary file

    def _run(self, start: float, index: ChunkIndex) -> BackupResult:
        assert index.ids is not None
        condemned = self.vault.condemned_chunks()
        self.stored_ids, self.condemned = index.ids, condemned
        self._chunks = ChunkReader(self.vault, index.locations, self.chunk_size)
        n = -(-self.size // self.chunk_size)
        to_read = self._plan(n)  # sets self.ids: zero, or the parent's (no copy: 32 MB for 1 TiB)
        self.stats.chunks_total = n
        self.stats.chunks_zero = n - len(to_read) - self.stats.chunks_from_parent
        self.added = SeenIds(len(to_read))  # what this backup stores: in the same memory on any disk
        self.packer = Packer(self.vault)
        self.progress = Progress("backup", sum(self._work(i) for i in to_read), self.callback)
        readers = max(1, self.threads // 2)
        workers = max(1, self.threads - readers)
        buffers = [mmap.mmap(-1, self.chunk_size)  # page-aligned: sources read into them with O_DIRECT
                   for _ in range(max(readers + workers, PREFETCH_BYTES // self.chunk_size))]
        try:
            run_pipeline(to_read, self._fill, self._digest, buffers, readers=readers, workers=workers)
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
        ranges = self.delta.get(i)
        return self._length(i) if ranges is None else sum(n for _, n in ranges)

    def _read_parent(self) -> Manifest | None:
        if self.parent_id is None:
            return None
        parent = self.vault.read_manifest(self.parent_id)
        if parent.chunk_size != self.chunk_size:
            raise InvalidInput(f"parent {self.parent_id} has another chunk size", code="PARENT_MISMATCH")
        return parent

    def _parent_blobs_to_read(self) -> IdSet:
        """The blobs of the parent's chunks that the changed extents touch: all a rebuild or a new layer
        can read (``_from_parent`` below), so the only locations this backup loads."""
        out = IdSet()
        if self.parent is None or self.changed is None:
            return out
        for i in chunks_touching(self.changed, self.chunk_size, self.size):
            if i < self.parent.chunk_count:
                out.add(self.parent.chunk_ids[i])
                out.update(layer.blob_id for layer in self.parent.deltas.get(i, []))
        return out

    def _plan(self, n: int) -> Collection[int]:
        """Chunks to read; ids of the others are set here (zero, or the parent's)."""
        parent = self.parent
        if parent is None:
            self.ids = ChunkIds.zeros(n)
            return self._with_data()
        if self.changed is None:  # no change tracking: read everything that holds data
            self.ids = ChunkIds.zeros(n)
            return self._with_data()
        must = set(chunks_touching(self.changed, self.chunk_size, self.size))
        # Only the changed bytes of a chunk changed in part are read from the source: the load on the VM's
        # storage follows what changed, not the chunk size. They are stored as a layer on the parent's
        # chunk while the layers stay few and small, so the work follows what changed too; else the
        # chunk is rebuilt from the parent's copy and stored whole.
        changes = split_by_chunk(self.changed, self.chunk_size, self.size)
        # Chunks the parent cannot supply (format.md §8: same span, and everything it is made of stored
        # or zero), found with set operations, not per chunk in Python: a disk of millions of chunks plans
        # in a fraction of a second.
        bad = self._not_reusable(n)
        # Chunks that keep the parent's layers, plus those layered now, stay within the share.
        room = max(MIN_LAYERED_ROOM, n // MAX_LAYERED_SHARE) - sum(
            1 for i in parent.deltas if i < n and i not in changes)
        for i, ranges in changes.items():
            changed = sum(r[1] for r in ranges)
            if changed >= self._length(i) or i in bad:
                continue
            layers = parent.deltas.get(i, [])
            if (room > 0 and len(layers) < MAX_LAYERS and len(ranges) <= MAX_RANGES
                    and (sum(layer.length for layer in layers) + changed) * MAX_LAYERED_FRACTION <= self._length(i)):
                self.delta[i] = ranges
                room -= 1
            else:
                self.patch[i] = ranges
        # Every other chunk is the parent's, unless it cannot be.
        common = min(n, parent.chunk_count)
        skip = must | bad
        # What rebuilding or layering a changed chunk starts from; then the parent's ids become ours
        # (no copy: a 1 TiB disk's ids are 32 MB) and the parent keeps only its layers.
        self._from_parent = {i: (parent.chunk_ids[i], parent.deltas.get(i, [])) for i in (*self.patch, *self.delta)}
        self.ids = parent.chunk_ids if n == parent.chunk_count else parent.chunk_ids.resized(n)
        parent.chunk_ids = ChunkIds()
        for i in skip:
            if i < common:
                self.ids[i] = ZERO_ID  # read below: zero unless the read finds data
        self.kept_deltas = parent.deltas
        self.keep_delta = lambda i: i < common and i not in skip
        self.stats.chunks_from_parent = (n - self.ids.count(ZERO_ID) + sum(
            1 for i in parent.deltas.indexes(0, common) if i not in skip and self.ids[i] == ZERO_ID))
        if bad:  # beyond the parent's end, another span, or its chunk is gone: read it if it may hold data
            data = self._with_data()
            must |= {i for i in bad if i in data}
        return sorted(must)

    def _not_reusable(self, n: int) -> set[int]:
        """Our chunk indexes the parent cannot supply: beyond its end, of another length (only a last chunk
        can be short), or made of a blob that is not stored (missing from the index, or condemned by gc)."""
        parent = self.parent
        assert parent is not None
        common = min(n, parent.chunk_count)
        bad = set(range(common, n))
        bad.update(i for i in {common - 1, n - 1} if 0 <= i < common and parent.chunk_length(i) != self._length(i))
        stored, condemned = self.stored_ids, self.condemned

        def gone(cid: bytes) -> bool:
            return cid != ZERO_ID and (cid not in stored or cid in condemned)

        # One pass over the ids as they are (from their file on a large disk), no set of them: a dense
        # disk's distinct ids would take ~58 bytes each.
        bad.update(i for i, cid in enumerate(parent.chunk_ids.ids(0, common)) if gone(cid))
        bad.update(i for i, layers in parent.deltas.items()
                   if i < common and any(gone(layer.blob_id) for layer in layers))
        return bad

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

    def _patched(self, i: int, out: memoryview) -> int | None:
        """Fill ``out`` with the parent's chunk and the changed ranges read from the source; the bytes
        read, or None if the parent's copy fails."""
        base, layers = self._from_parent[i]
        try:
            self._chunks.layered_into(base, layers, out, what=f"parent {self.parent_id} chunk {i}")
        except RakshaError:
            return None  # damaged or gone: read the whole chunk from the source instead
        read = 0
        for off, n in self.patch[i]:
            self._read(i * self.chunk_size + off, out[off : off + n])
            read += n
        return read

    def _fill(self, i: int, buf: mmap.mmap) -> _Filled:
        """The I/O of chunk ``i`` (in a reader thread): its changed ranges one after another for a new
        layer, else the whole chunk (rebuilt on the parent's copy where it changed in part)."""
        ranges = self.delta.get(i)
        if ranges is not None:
            length = sum(n for _, n in ranges)
            data = memoryview(buf)[:length]
            pos = 0
            for off, n in ranges:
                self._read(i * self.chunk_size + off, data[pos : pos + n])
                pos += n
            return _Filled(length, length, patched=False)
        length = self._length(i)
        data = memoryview(buf)[:length]
        read = self._patched(i, data) if i in self.patch else None
        if read is not None:
            return _Filled(length, read, patched=True)
        self._read(i * self.chunk_size, data)
        return _Filled(length, length, patched=False)

    def _digest(self, i: int, buf: mmap.mmap, filled: _Filled) -> None:
        """The computing of chunk ``i`` (in a worker thread): hash, then store unless zero or stored."""
        data = memoryview(buf)[: filled.length]
        delta = i in self.delta
        with self._lock:
            self.stats.bytes_read += filled.read
            self.stats.chunks_read += 1
            self.stats.chunks_patched += filled.patched
            self.stats.chunks_delta += delta
        cid = self.vault.crypto.chunk_id(data)
        zero = cid == self._zero_id(filled.length)
        if delta:
            self._layer(i, ZERO_ID if zero else cid, data)
        elif zero:
            with self._lock:
                self.stats.chunks_zero += 1
        else:
            self.ids[i] = cid
            self._store(cid, data)
        self.progress.add(filled.length)

    def _layer(self, i: int, cid: bytes, data: memoryview) -> None:
        """Chunk ``i`` becomes the parent's copy with one more layer: ``data``, the changed ranges."""
        if cid != ZERO_ID:  # a layer of zeros is stored as nothing
            self._store(cid, data)
        base, below = self._from_parent[i]
        self.ids[i] = base
        entry = encode_layers(i, [*below, Layer(cid, tuple(self.delta[i]))])
        with self._lock:
            self.new_deltas[i] = entry

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
            deltas=Deltas.merged(self.kept_deltas, self.keep_delta, self.new_deltas),
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
                {"count": len(self.changed), "bytes": sum(e[1] for e in self.changed)}
                if self.changed is not None else None
            ),
            "stats": asdict(self.stats),
            "checksums": {"content_digest": digest},
            "hints": self.hints,
        }
        self.vault.write_backup(manifest, metadata)
        return BackupResult(self.id, kind, self.parent_id, self.stats, digest)
