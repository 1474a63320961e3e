"""Restore one backup to a raw or qcow2 image, sparsely, checking every chunk against its id."""

from __future__ import annotations

import bisect
import mmap
import os
import struct
import time
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from raksha.domain.errors import ChunkMissing, InvalidInput, NotFound, VaultCorrupt
from raksha.vault.directio import ALIGN, AlignedBuffers, aligned_span, nonzero_runs
from raksha.vault.engine.blobio import ChunkReader
from raksha.vault.engine.changes import chunks_to_roll_back
from raksha.vault.engine.progress import Progress, ProgressCallback
from raksha.vault.engine.workers import BufferPool, Drain, run_parallel, run_pipeline
from raksha.vault.format.chunk_table import IdSet
from raksha.vault.format.constants import ID_SIZE, ZERO_ID
from raksha.vault.format.deltas import Layer
from raksha.vault.format.index import Location
from raksha.vault.format.manifest import Manifest
from raksha.vault.format.naming import BackupId
from raksha.vault.format.pack import pack_key
from raksha.vault.locks import LockKind
from raksha.vault.malloc import POOL, anonymous_map
from raksha.vault.repository import ChunkIndex, Vault
from raksha.vault.sources.base import InPlaceTarget
from raksha.vault.sources.nbd import NbdInPlace
from raksha.vault.sources.open import create_target, refuse_if_in_use
from raksha.vault.sources.raw import RawTarget

# Blobs next to each other in a pack are fetched with one read of up to READ_SPAN bytes (skipping gaps
# of up to READ_GAP: blobs this backup does not need), so the vault is read in large sequential pieces.
READ_SPAN = 2 << 20
READ_GAP = 256 << 10
# Pack spans read ahead of the decoders, and decoded chunks waiting for the writers, at most (or one per
# thread and two, if more): the vault's reads go on while the writers wait their turn.
SPAN_BYTES = 16 << 20
OUT_BYTES = 24 << 20
# Chunks planned at a time (16 GiB of disk at 1 MiB chunks): what a restore holds per chunk to plan
# (about 400 bytes: where its blob is, which chunks it fills) stays a few MB on any disk. A blob used
# in two windows is read twice.
RESTORE_WINDOW = 1 << 14
_ROW = struct.Struct(f"{ID_SIZE}s")
# Blobs whose locations are loaded at a time (256 GiB of data at 1 MiB chunks; ~30 MB of id set and
# locations): a disk with more data scans the index once per window, a sparse one of any size once.
INDEX_WINDOW = 1 << 18


def restore_threads() -> int:
    """Four per core, for chunks with layers (each worker reads a base and its layers, assembles and writes
    the chunk): a restore waits on the device more than it computes. Measured on 2 cores: 8 threads
    2.3-2.5 s, 4 threads 2.8-3.0 s, same CPU time."""
    return 4 * max(1, os.cpu_count() or 1)


def restore_stages(threads: int | None = None) -> tuple[int, int, int]:
    """Threads reading the vault, decoding, and writing the output, for whole chunks: two readers keep the
    vault's reads ahead, one decoder a core, two writers. ``threads`` (the CLI's ``--threads``) is split
    among the three, at least one each.

    Why stages: writes into a fresh sparse file wait one at a time for the inode's lock (ext4 allocates
    under it). Eight threads that each read, decoded and wrote in turn spent 6.8 of 8 threads' time
    there, with the vault's reads starved meanwhile; with writes in threads of their own the reads and
    the decoding go on (2 GiB bench image, 8 alternated pairs: 1.64-1.73 s against 1.75-1.80 s). The
    writers only write: with the zero-block scan in them too, the gain was gone."""
    if threads is None:
        return 2, max(1, os.cpu_count() or 1), 2
    edge = max(1, threads // 3)
    return edge, max(1, threads - 2 * edge), edge

Work = tuple[Location, bytes, list[int]]  # where the blob is, its chunk id, the chunk indexes it fills


def read_groups(work: list[Work]) -> list[list[Work]]:
    """``work`` (sorted by pack and offset) cut into runs that one ranged read of a pack can fetch."""
    groups: list[list[Work]] = []
    for item in work:
        loc = item[0]
        if groups:
            first, last = groups[-1][0][0], groups[-1][-1][0]
            end = last.offset + last.stored_length
            if (loc.pack_id == first.pack_id and 0 <= loc.offset - end <= READ_GAP
                    and loc.offset + loc.stored_length - first.offset <= READ_SPAN):
                groups[-1].append(item)
                continue
        groups.append([item])
    return groups


def window_work(manifest: Manifest, locations: Mapping[bytes, Location], start: int, end: int,
                ) -> tuple[list[Work], list[list[int]]]:
    """What restoring chunks [start, end) takes: the blobs to read, sorted by pack and offset (each
    once, with every chunk it fills), and the runs of zero chunks as [first, end)."""
    by_id: dict[bytes, list[int]] = {}
    zeros: list[list[int]] = []
    deltas = manifest.deltas
    # Piece by piece, not id by id: a large disk's ids are read from a file.
    for i, cid in enumerate(manifest.chunk_ids.ids(start, end), start):
        if i in deltas:
            continue  # base + layers, assembled on their own
        if cid != ZERO_ID:
            by_id.setdefault(cid, []).append(i)
        elif zeros and zeros[-1][1] == i:
            zeros[-1][1] = i + 1
        else:
            zeros.append([i, i + 1])
    work = [(locations[cid], cid, offsets) for cid, offsets in by_id.items()]
    work.sort(key=lambda w: (w[0].pack_id, w[0].offset))  # read packs front to back
    return work, zeros


@dataclass
class RestoreResult:
    id: BackupId
    output: str
    format: str
    virtual_size: int
    bytes_written: int
    chunks_verified: int
    content_digest: str
    seconds: float
    blobs: int = -1  # restore_chunks: the distinct blobs the written chunks need (all of them verified when done)

    def to_dict(self) -> dict[str, Any]:
        mb_s = self.virtual_size / self.seconds / 1e6 if self.seconds else 0.0
        return {"id": str(self.id), "output": self.output, "format": self.format,
                "virtual_size": self.virtual_size, "bytes_written": self.bytes_written,
                "chunks_verified": self.chunks_verified, "verified": True,
                "content_digest": self.content_digest, "seconds": round(self.seconds, 3),
                "mb_s": round(mb_s, 1)}


def restore_backup(
    vault: Vault,
    backup_id: BackupId,
    output: str,
    *,
    fmt: str = "raw",
    overwrite: bool = False,
    threads: int | None = None,
    progress: ProgressCallback | None = None,
) -> RestoreResult:
    POOL.clear()  # a backup's idle buffers, not used here: a restore's own are the process's peak
    with vault.locks.acquire(LockKind.SHARED, f"restore {backup_id}"):
        start = time.monotonic()
        manifest = vault.read_manifest(backup_id)
        windows = index_windows(manifest)
        # The first window's locations before anything is written: a restore that cannot even begin
        # leaves nothing behind (a disk of one window, nearly all, fails before creating its output).
        index = _locations(vault, manifest, backup_id, *windows[0])
        into = getattr(vault.backend, "get_range_into", None)
        n_readers, n_decoders, n_writers = restore_stages(threads)
        spans = [[anonymous_map(READ_SPAN + ALIGN)]
                 for _ in range(max(n_readers + n_decoders + 2, SPAN_BYTES // READ_SPAN))]
        outs: BufferPool[mmap.mmap] = BufferPool(
            anonymous_map(manifest.chunk_size)
            for _ in range(max(n_decoders + n_writers + 2, OUT_BYTES // manifest.chunk_size)))
        data = (manifest.chunk_size, data_chunks(manifest)) if fmt == "qcow2" else None
        target = create_target(output, fmt, manifest.virtual_size, overwrite=overwrite, data_chunks=data)
        total = manifest.data_bytes()
        meter = Progress("restore", total, progress)
        chunks = ChunkReader(vault, index.locations, manifest.chunk_size)
        # Chunks are decoded into page-aligned buffers that a raw target writes with O_DIRECT as they are
        # (a layered chunk: this thread's; a whole one: a pool's, between decoders and writers).
        out_buffers = AlignedBuffers(manifest.chunk_size)
        views_ok = target.takes_views
        # A fresh raw image starts all zero: zero blocks inside chunks (a hole in the middle of one) are
        # not written. Less I/O, and the restored image is as sparse as the original.
        skip_zero_blocks = views_ok and target.fresh

        def runs_of(out_buffer: mmap.mmap, data: memoryview) -> list[tuple[int, int]]:
            return nonzero_runs(out_buffer, len(data)) if skip_zero_blocks else [(0, len(data))]

        def write(i: int, data: memoryview, runs: list[tuple[int, int]]) -> None:
            for start, end in runs:
                # RawTarget.pwrite takes views; DiskTarget's protocol only promises bytes.
                piece = cast(bytes, data[start:end]) if views_ok else bytes(data[start:end])
                target.pwrite(piece, i * manifest.chunk_size + start)
            meter.add(len(data))

        def one_delta(i: int) -> None:
            out_buffer = out_buffers.get()
            data = memoryview(out_buffer)[: manifest.chunk_length(i)]
            if skip_zero_blocks and manifest.chunk_ids[i] == ZERO_ID:
                # Layers on a hole (writes where the parent had nothing): only the blocks they touch can
                # hold data, and a fresh image reads as zeros elsewhere. No fill or scan of the chunk.
                layers = manifest.deltas[i]
                runs = touched_blocks(layers, len(data))
                for start, end in runs:
                    data[start:end] = bytes(end - start)
                chunks.layers_into(layers, data, what=f"backup {manifest.id} chunk {i}")
                for start, end in runs:
                    target.pwrite(cast(bytes, data[start:end]), i * manifest.chunk_size + start)
                meter.add(len(data))
                return
            chunks.chunk_into(manifest, i, data)
            write(i, data, runs_of(out_buffer, data))

        def read_span(group: list[Work], holder: list[mmap.mmap]) -> memoryview | bytes:
            """Reader stage: the pack bytes from the group's first blob to its last, into ``holder``'s buffer."""
            first, last = group[0][0], group[-1][0]
            key, length = pack_key(first.pack_id.hex()), last.offset + last.stored_length - first.offset
            try:
                if into is None:
                    return vault.backend.get_range(key, first.offset, length)
                if len(holder[0]) < aligned_span(first.offset, length):  # one blob larger than READ_SPAN
                    holder[0].close()
                    holder[0] = anonymous_map(aligned_span(first.offset, length))
                return cast(memoryview, into(key, first.offset, length, holder[0]))
            except NotFound:
                raise ChunkMissing(
                    f"backup {backup_id}: chunk {group[0][1].hex()} is missing from the vault (its pack {key} is "
                    "gone); run 'raksha vault verify'",
                    backup=str(backup_id), chunks=[c.hex() for _, c, _ in group[:10]], object=key,
                ) from None

        def decode_span(group: list[Work], _holder: list[mmap.mmap], span: memoryview | bytes) -> None:
            """Decoder stage: each blob checked against its id into a chunk buffer, handed to the writers."""
            decoder = chunks.decoder()
            first = group[0][0]
            key = pack_key(first.pack_id.hex())
            for loc, cid, offsets in group:
                lo = loc.offset - first.offset
                blob = span[lo : lo + loc.stored_length]
                if len(blob) != loc.stored_length:
                    raise VaultCorrupt(f"{key}@{loc.offset}: truncated pack", object=key)
                out_buffer = outs.take(writers)
                data = decoder.decode_into(blob, cid, loc.raw_length, memoryview(out_buffer),
                                           what=f"{key}@{loc.offset}")
                # The writers only write: what they do besides holds the next write back.
                writers.submit(partial(write_out, offsets, out_buffer, data, runs_of(out_buffer, data)))

        def write_out(offsets: list[int], out_buffer: mmap.mmap, data: memoryview,
                      runs: list[tuple[int, int]]) -> None:
            """Writer stage."""
            for i in offsets:
                write(i, data, runs)
            outs.give(out_buffer)

        writers = Drain(n_writers, "raksha-writer")
        verified = 0
        try:
            for n, (first_chunk, last_chunk) in enumerate(windows):
                if n:
                    index = _locations(vault, manifest, backup_id, first_chunk, last_chunk)
                    chunks = ChunkReader(vault, index.locations, manifest.chunk_size)
                for window in range(first_chunk, last_chunk, RESTORE_WINDOW):
                    work, zeros = window_work(manifest, index.locations, window,
                                              min(window + RESTORE_WINDOW, last_chunk))
                    run_pipeline(read_groups(work), read_span, decode_span, spans, readers=n_readers,
                                 workers=n_decoders)
                    writers.join()  # this window's chunks are written before the next window is planned
                    for first, end in zeros:
                        offset = first * manifest.chunk_size
                        target.write_zeroes(offset, min(end * manifest.chunk_size, manifest.virtual_size) - offset)
                run_parallel(manifest.deltas.indexes(first_chunk, last_chunk), one_delta, threads or restore_threads())
                verified += len(index.locations)
            writers.close()
            target.flush()
        except BaseException:
            writers.close(abort=True)
            target.close()
            target.discard()
            raise
        target.close()
        target.commit()  # only now does OUTPUT exist: a killed restore never leaves a half-written one
        meter.finish()
        return RestoreResult(backup_id, output, fmt, manifest.virtual_size, total, verified,
                             manifest.content_digest(), time.monotonic() - start)


def restore_chunks(
    vault: Vault,
    backup_id: BackupId,
    target: InPlaceTarget,
    chunks: Sequence[int],
    *,
    parts: Mapping[int, Sequence[tuple[int, int]]] | None = None,
    threads: int | None = None,
    progress: ProgressCallback | None = None,
) -> RestoreResult:
    """Write only ``chunks`` (indexes, in order) of a backup into ``target``, an existing image of its
    size, and leave the rest of it as it is: a restore in place that writes what differs (the caller
    knows which chunks those are; of a chunk in ``parts``, only those [start, end) ranges inside it).
    All-zero data is written as zeroes, every blob is checked against its id, and ``chunks_verified``
    counts the distinct blobs the written chunks needed. The caller closes ``target``."""
    POOL.clear()  # as restore_backup
    with vault.locks.acquire(LockKind.SHARED, f"restore {backup_id}"):
        start = time.monotonic()
        manifest = vault.read_manifest(backup_id)
        if chunks and not 0 <= chunks[0] <= chunks[-1] < manifest.chunk_count:
            raise InvalidInput(f"chunks {chunks[0]}..{chunks[-1]} are outside backup {backup_id}",
                               code="INVALID_INPUT")
        needed = IdSet(cid for i in chunks for cid in _chunk_blob_ids(manifest, i))
        index = _needed_locations(vault, backup_id, needed)
        reader = ChunkReader(vault, index.locations, manifest.chunk_size)
        buffers = AlignedBuffers(manifest.chunk_size)
        parts = parts or {}

        def ranges(i: int) -> Sequence[tuple[int, int]]:
            return parts.get(i) or ((0, manifest.chunk_length(i)),)

        total = sum(end - start for i in chunks for start, end in ranges(i))
        meter = Progress("restore", total, progress)
        verified: set[bytes] = set()  # blobs decoded and checked against their ids

        def one(i: int) -> None:
            length, offset, pieces = manifest.chunk_length(i), i * manifest.chunk_size, ranges(i)
            if manifest.chunk_ids[i] == ZERO_ID and i not in manifest.deltas:
                for start, end in pieces:
                    target.write_zeroes(offset + start, end - start)
            else:
                data = memoryview(buffers.get())[:length]
                reader.chunk_into(manifest, i, data)  # raises on a blob that does not match its id
                verified.update(_chunk_blob_ids(manifest, i))
                for start, end in pieces:
                    target.pwrite(bytes(data[start:end]), offset + start)
            meter.add(sum(end - start for start, end in pieces))

        run_parallel(chunks, one, threads or restore_threads())
        target.flush()
        meter.finish()
        return RestoreResult(backup_id, target.path, target.format, manifest.virtual_size, total, len(verified),
                             manifest.content_digest(), time.monotonic() - start, blobs=len(needed))


def restore_over(
    vault: Vault,
    backup_id: BackupId,
    output: str,
    since: BackupId,
    changed_extents: Sequence[tuple[int, int]],
    *,
    fmt: str = "raw",
    threads: int | None = None,
    progress: ProgressCallback | None = None,
) -> RestoreResult:
    """Restore ``backup_id`` onto the existing image ``output``, which the caller says holds backup
    ``since`` except in ``changed_extents`` (written since; e.g. from a dirty bitmap, ``rbd diff``, LVM
    thin deltas): only what differs is written, in place (ADR 0022). A claim that is not true leaves an
    image that is not the backup: nothing here can tell."""
    point, base = vault.read_manifest(backup_id), vault.read_manifest(since)
    if (point.chunk_size, point.virtual_size) != (base.chunk_size, base.virtual_size):
        raise InvalidInput(f"backups {backup_id} and {since} are of disks of other sizes or chunk sizes",
                           code="SIZE_MISMATCH")
    if fmt not in ("raw", "qcow2"):
        raise InvalidInput(f"restore format {fmt!r} is not supported (raw or qcow2)", code="INVALID_FORMAT")
    if not os.path.exists(output):
        raise NotFound(f"{output}: no such image to restore over", code="OUTPUT_NOT_FOUND")
    refuse_if_in_use(output)
    target: NbdInPlace | RawTarget = NbdInPlace(output, fmt) if fmt == "qcow2" else \
        RawTarget(output, point.virtual_size, fresh=False)
    try:
        size = target.virtual_size if isinstance(target, NbdInPlace) else _size_of(output)
        if size != point.virtual_size:
            raise InvalidInput(f"{output} is {size} bytes; backup {backup_id} is of a disk of {point.virtual_size}",
                               code="SIZE_MISMATCH")
        chunks, parts = chunks_to_roll_back(point, base, changed_extents)
        return restore_chunks(vault, backup_id, target, chunks, parts=parts, threads=threads, progress=progress)
    finally:
        target.close()


def _size_of(path: str) -> int:
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


def _chunk_blob_ids(manifest: Manifest, i: int) -> Iterator[bytes]:
    cid = manifest.chunk_ids[i]
    if cid != ZERO_ID:
        yield cid
    for layer in manifest.deltas.get(i, ()):
        if layer.blob_id != ZERO_ID:
            yield layer.blob_id


def touched_blocks(layers: Sequence[Layer], length: int) -> list[tuple[int, int]]:
    """The ALIGN blocks of a chunk of ``length`` bytes that ``layers`` write, as [start, end) runs in order
    (the last may end unaligned at ``length``), as ``nonzero_runs`` gives them."""
    spans = sorted((off - off % ALIGN, min(length, -(-(off + n) // ALIGN) * ALIGN))
                   for layer in layers for off, n in layer.ranges)
    runs: list[tuple[int, int]] = []
    for start, end in spans:
        if runs and start <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], end))
        else:
            runs.append((start, end))
    return runs


def index_windows(manifest: Manifest) -> list[tuple[int, int]]:
    """The [first, end) ranges of chunks whose blobs a restore loads together: each needs at most about
    INDEX_WINDOW blobs (stored chunks and layers, counted with repeats), so a disk of any size with less
    data than that is one window and one scan of the index."""
    windows: list[tuple[int, int]] = []
    layered = manifest.deltas.indexes()
    counts = array("I", (count for _, count in manifest.deltas.layer_counts()))
    first = count = 0
    for i, piece, lo, hi in _pieces_with_data(manifest, layered):
        extra = dict(zip(layered[lo:hi], counts[lo:hi], strict=True))
        for k, cid in enumerate(_ROW.iter_unpack(piece), i):
            count += (cid[0] != ZERO_ID) + extra.get(k, 0)
            if count >= INDEX_WINDOW:
                windows.append((first, k + 1))
                first, count = k + 1, 0
    if first < manifest.chunk_count or not windows:
        windows.append((first, manifest.chunk_count))
    return windows


def data_chunks(manifest: Manifest) -> array[int]:
    """The indexes of the chunks that hold data (a stored chunk, or layers), in order: what a new qcow2
    image allocates."""
    out = array("q")
    layered = manifest.deltas.indexes()
    for i, piece, lo, hi in _pieces_with_data(manifest, layered):
        extra = set(layered[lo:hi])
        out.extend(k for k, cid in enumerate(_ROW.iter_unpack(piece), i) if cid[0] != ZERO_ID or k in extra)
    return out


def _pieces_with_data(manifest: Manifest, layered: Sequence[int]) -> Iterator[tuple[int, bytes | memoryview, int, int]]:
    """The manifest's chunk ids piece by piece (a large disk's are read from a file), as (index of the
    piece's first chunk, its ids, [lo, hi) of ``layered``, the layered chunks, that fall in it), leaving
    out pieces of zero ids without layers: most of a sparse disk, with nothing to load or write."""
    i = 0
    for piece in manifest.chunk_ids.pieces():
        n = len(piece) // ID_SIZE
        lo, hi = bisect.bisect_left(layered, i), bisect.bisect_left(layered, i + n)
        if lo != hi or piece != bytes(len(piece)):
            yield i, piece, lo, hi
        i += n


def blobs_to_verify(manifest: Manifest) -> int:
    """How many blobs a restore of ``manifest`` checks against their ids (``chunks_verified``): the distinct
    ones of each of its ``index_windows`` (a blob used in two windows is read and checked in each)."""
    return sum(len(manifest.blob_ids(first, end)) for first, end in index_windows(manifest))


def _locations(vault: Vault, manifest: Manifest, backup_id: BackupId, first: int, end: int) -> ChunkIndex:
    """The locations of what chunks ``first`` to ``end`` need, or CHUNK_MISSING or VAULT_CORRUPT naming
    what is not in the vault. Only these: a restore's memory follows neither the vault nor the disk."""
    return _needed_locations(vault, backup_id, manifest.blob_ids(first, end))


def _needed_locations(vault: Vault, backup_id: BackupId, needed: IdSet) -> ChunkIndex:
    """The locations of ``needed`` blobs of a backup, or CHUNK_MISSING or VAULT_CORRUPT naming what is
    not in the vault. Tolerant: a damaged index object must not stop restores that do not need it."""
    if not needed:
        return ChunkIndex()  # all zero: no index to read
    index = vault.load_index(tolerant=True, only=needed)
    missing = [cid for cid in needed if cid not in index]
    if missing and index.damaged:
        raise VaultCorrupt(
            f"backup {backup_id} needs {len(missing)} chunk(s) listed in no readable index; damaged index "
            f"object(s): {', '.join(sorted(index.damaged))}. Run 'raksha vault verify', then "
            "'raksha vault rebuild-index'",
            backup=str(backup_id), objects=sorted(index.damaged), chunks=[m.hex() for m in missing[:10]],
        )
    if missing:
        raise ChunkMissing(
            f"backup {backup_id} references {len(missing)} chunk(s) missing from the vault "
            f"(first: {missing[0].hex()}); run 'raksha vault verify'",
            backup=str(backup_id), chunks=[m.hex() for m in missing[:10]],
        )
    return index
