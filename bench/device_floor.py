"""The device floor: how long the disk alone needs for the I/O a backup and a restore must do.

A full backup must read the image's data and write what it stores; a restore must read what was
stored and write the image's data. Both are measured here with nothing else: O_DIRECT reads and
writes from two threads each, at the same time, cold cache, the same sizes Raksha uses (whole 1 MiB
chunks of the image read, 2 MiB pieces of a store file, the image's data written back to a sparse
file at its own offsets, holes skipped), each followed by fsync. No hashing, compressing or encrypting: no tool that
does the same I/O can be faster than this on the machine, so a speed target beyond it is out of
reach whatever the software. The bench reports each tool's time as a multiple of it.

    python bench/device_floor.py IMAGE STORED_BYTES WORKDIR
"""

from __future__ import annotations

import json
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import imagegen

CHUNK = 1 << 20  # Raksha's default chunk: a backup reads the image in these
PIECE = 2 << 20  # a store file is read and written in these (Raksha's pack reads and writes)
THREADS = 2  # readers, and as many writers
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def data_extents(image: Path) -> list[tuple[int, int]]:
    """The image's data as (offset, length)."""
    with open(image, "rb") as f:
        return [(start, end - start) for start, end in imagegen.data_segments(f.fileno(), os.fstat(f.fileno()).st_size)]


def data_chunks(image: Path) -> list[int]:
    """Offsets of the image's 1 MiB chunks that hold data: what a backup reads."""
    out: list[int] = []
    for start, length in data_extents(image):
        for i in range(start // CHUNK, (start + length - 1) // CHUNK + 1):
            if not out or out[-1] != i * CHUNK:
                out.append(i * CHUNK)
    return out


def data_pieces(image: Path) -> list[tuple[int, int]]:
    """The image's data cut at chunk borders: what a sparse restore writes (holes inside chunks not)."""
    out: list[tuple[int, int]] = []
    for start, length in data_extents(image):
        end = start + length
        while start < end:
            stop = min(end, (start // CHUNK + 1) * CHUNK)
            out.append((start, stop - start))
            start = stop
    return out


def _cold() -> None:
    os.sync()
    if os.access(DROP_CACHES, os.W_OK):
        DROP_CACHES.write_text("3\n")


def _together(*jobs: tuple[Iterator[Any], Callable[[Any, mmap.mmap], None], int]) -> None:
    """Run every job (offsets, action, buffer size) on THREADS threads each, all at once."""
    lock = threading.Lock()
    errors: list[BaseException] = []

    def loop(offsets: Iterator[Any], act: Callable[[Any, mmap.mmap], None], size: int) -> None:
        buf = mmap.mmap(-1, size)
        buf.write(os.urandom(size))  # written data is incompressible, as stored data is
        try:
            while True:
                with lock:
                    off = next(offsets, None)
                if off is None:
                    return
                act(off, buf)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=job) for job in jobs for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def backup_floor(image: Path, chunks: list[int], stored: int, store: Path) -> float:
    """Read the image's data ``chunks`` while writing ``stored`` bytes to ``store``; then fsync."""
    _cold()
    src = os.open(image, os.O_RDONLY | os.O_DIRECT)
    dst = os.open(store, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    try:
        start = time.monotonic()
        _together(
            (iter(chunks), lambda off, buf: os.preadv(src, [buf], off), CHUNK),
            (iter(range(0, stored, PIECE)), lambda off, buf: os.pwritev(dst, [buf], off), PIECE),
        )
        os.fsync(dst)
        return time.monotonic() - start
    finally:
        os.close(src)
        os.close(dst)


def restore_floor(size: int, pieces: list[tuple[int, int]], store: Path, out: Path) -> float:
    """Read ``store`` while writing the image's data ``pieces`` at their offsets into a fresh sparse
    file of ``size`` bytes."""
    _cold()
    src = os.open(store, os.O_RDONLY | os.O_DIRECT)
    out.unlink(missing_ok=True)
    dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    try:
        os.ftruncate(dst, size)
        start = time.monotonic()
        _together(
            (iter(range(0, os.fstat(src).st_size, PIECE)), lambda off, buf: os.preadv(src, [buf], off), PIECE),
            (iter(pieces), lambda piece, buf: os.pwritev(dst, [memoryview(buf)[: piece[1]]], piece[0]),
             CHUNK),
        )
        os.fsync(dst)
        return time.monotonic() - start
    finally:
        os.close(src)
        os.close(dst)


def measure(image: Path, stored: int, workdir: Path, runs: int = 2) -> dict[str, float]:
    """The fastest of ``runs`` runs of each floor, in seconds; scratch files in ``workdir`` are removed."""
    store, out = workdir / "floor-store", workdir / "floor-restore.img"
    chunks, pieces = data_chunks(image), data_pieces(image)  # the image's map, walked once and untimed
    try:
        backup = min(backup_floor(image, chunks, stored, store) for _ in range(runs))
        restore = min(restore_floor(image.stat().st_size, pieces, store, out) for _ in range(runs))
    finally:
        store.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
    return {"backup_seconds": backup, "restore_seconds": restore, "stored_bytes": stored,
            "read_bytes": len(chunks) * CHUNK,  # by a backup: whole chunks
            "data_bytes": sum(n for _, n in pieces)}  # written by a sparse restore


if __name__ == "__main__":
    image, stored, workdir = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    print(json.dumps(measure(image, stored, workdir), indent=1))
