"""Unnamed temporary files for what a backup or restore keeps out of memory (a large disk's ids).

In ``$TMPDIR`` (``tempfile.gettempdir()``), gone with the process however it ends. Errors are the
vault's: a full filesystem is STORAGE_FULL naming the directory, any other failure BACKEND_IO.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from typing import IO

from raksha.domain.errors import BackendError, RakshaError, StorageFull
from raksha.vault.directio import pwrite_fully


def scratch_file(what: str) -> IO[bytes]:
    try:
        return tempfile.TemporaryFile(buffering=0)  # its owner closes it
    except OSError as exc:
        raise _error(exc, what) from exc


def write_at(f: IO[bytes], data: bytes | memoryview, pos: int, what: str) -> None:
    error = pwrite_fully(f.fileno(), data, pos)
    if error is not None:
        raise _error(error, what) from error


def read_at(f: IO[bytes], n: int, pos: int, what: str) -> bytes:
    """Exactly ``n`` bytes (the file is at least that long: a short read is only a partial one)."""
    try:
        data = os.pread(f.fileno(), n, pos)
        while len(data) < n:
            more = os.pread(f.fileno(), n - len(data), pos + len(data))
            if not more:
                raise BackendError(f"{what}: temporary file in {tempfile.gettempdir()} shorter than written")
            data += more
    except OSError as exc:
        raise _error(exc, what) from exc
    return data


def truncate(f: IO[bytes], size: int, what: str) -> None:
    try:
        os.ftruncate(f.fileno(), size)
    except OSError as exc:
        raise _error(exc, what) from exc


def _error(exc: OSError, what: str) -> RakshaError:
    where = tempfile.gettempdir()
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no space left in {where} for {what}; point TMPDIR at a larger filesystem")
    return BackendError(f"{what}: temporary file in {where}: {exc.strerror or exc}")


class Partitions:
    """Records appended to numbered partitions, each then read back whole, one partition at a time.

    What a caller sorts or groups in memory a partition at a time (a large vault's ids, its index rows by
    pack): the buffers hold ``buffer_bytes`` in all, and a partition's buffer that fills is spilled to an
    unnamed temporary file. Appending is the caller's hot loop: it adds to ``buffers[part]`` itself and
    calls ``spill`` once that is at least ``flush_at`` bytes.
    """

    def __init__(self, parts: int, buffer_bytes: int, what: str, *, min_flush: int = 1024) -> None:
        self.what = what
        self.buffers: list[bytearray] = [bytearray() for _ in range(parts)]
        self.flush_at = max(min_flush, buffer_bytes // parts)
        self._segments: list[list[tuple[int, int]]] = [[] for _ in range(parts)]  # (offset, size) each
        self._file: IO[bytes] | None = None
        self._end = 0

    def spill(self, part: int) -> None:
        """Move partition ``part``'s buffer to the file."""
        buf = self.buffers[part]
        if self._file is None:
            self._file = scratch_file(self.what)
        with memoryview(buf) as view:
            write_at(self._file, view, self._end, self.what)
        self._segments[part].append((self._end, len(buf)))
        self._end += len(buf)
        del buf[:]

    def read(self, part: int) -> bytes:
        """Everything appended to ``part`` so far, in order (the partition stays: read it again, or
        append more)."""
        pieces = [read_at(self._file, size, at, self.what)
                  for at, size in self._segments[part]] if self._file is not None else []
        pieces.append(bytes(self.buffers[part]))
        return b"".join(pieces)

    def take(self, part: int) -> bytes:
        """``read``, freeing the partition's buffer: take each partition once, and append no more."""
        data = self.read(part)
        self.buffers[part] = bytearray()
        self._segments[part] = []
        return data

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class SpillingBuffer:
    """Bytes appended at the end and read back anywhere: a ``bytearray`` until it passes ``limit``, then an
    unnamed temporary file (the page cache holds it, not the process; appends are batched).

    Appending is not thread-safe; reading is, once appending is over."""

    _BATCH = 256 << 10

    def __init__(self, what: str, limit: int = 1 << 20) -> None:
        self.what = what
        self._limit = limit
        self._mem = bytearray()  # everything, or (in a file) what is not written yet
        self._file: IO[bytes] | None = None
        self._written = 0  # bytes in the file
        self.size = 0

    @property
    def in_file(self) -> bool:
        return self._file is not None

    def append(self, data: bytes | bytearray | memoryview) -> int:
        """Add ``data``; where it starts."""
        at = self.size
        self._mem += data
        self.size += len(data)
        if self._file is None and len(self._mem) > self._limit:
            self._file = scratch_file(self.what)
            self._spill()
        elif self._file is not None and len(self._mem) >= self._BATCH:
            self._spill()
        return at

    def _spill(self) -> None:
        assert self._file is not None
        with memoryview(self._mem) as view:
            write_at(self._file, view, self._written, self.what)
        self._written += len(self._mem)
        self._mem = bytearray()

    def read(self, pos: int, n: int) -> bytes | memoryview:
        """``n`` bytes from ``pos`` (a view while in memory: valid until the next append)."""
        if self._file is None:
            return memoryview(self._mem)[pos : pos + n]
        if pos >= self._written:
            return memoryview(self._mem)[pos - self._written : pos - self._written + n]
        if pos + n <= self._written:
            return read_at(self._file, n, pos, self.what)
        head = read_at(self._file, self._written - pos, pos, self.what)
        return head + self._mem[: n - len(head)]

    def pieces(self, start: int = 0, piece: int = 1 << 20) -> Iterator[bytes | memoryview]:
        """Everything from ``start`` in consecutive buffers of at most ``piece`` bytes."""
        pos = start
        while pos < self.size:
            n = min(piece, self.size - pos)
            yield self.read(pos, n)
            pos += n

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._mem = bytearray()
        self._written = self.size = 0
