"""Raw images and block devices, read with pread and written sparsely."""

from __future__ import annotations

import errno
import mmap
import os
import stat
import threading
from collections.abc import Sequence

from raksha.domain.errors import SourceError
from raksha.vault.directio import ALIGN, open_direct, pwrite_all
from raksha.vault.malloc import anonymous_map
from raksha.vault.sources.base import Extent


class RawSource:
    format = "raw"

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(self._fd)
        self._is_file = stat.S_ISREG(st.st_mode)
        self.virtual_size = st.st_size if self._is_file else os.lseek(self._fd, 0, os.SEEK_END)
        if self._is_file:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        # Whole chunks are read past the page cache (``readinto``): cheaper for the kernel than a
        # buffered read and its copy, and a backup does not evict what the host has cached.
        self._direct_fd, direct = open_direct(path, os.O_RDONLY | os.O_CLOEXEC)
        if not direct:
            os.close(self._direct_fd)
            self._direct_fd = -1

    def data_extents(self) -> Sequence[Extent]:
        """Walk SEEK_DATA/SEEK_HOLE so holes are never read; devices report everything as data."""
        if not self._is_file:
            return [(0, self.virtual_size)]
        out: list[Extent] = []
        pos = 0
        while pos < self.virtual_size:
            try:
                start = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    break
                raise SourceError(f"{self.path}: cannot map extents: {exc}") from exc
            end = os.lseek(self._fd, start, os.SEEK_HOLE)
            out.append((start, end - start))
            pos = end
        return out

    def pread(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise SourceError(f"{self.path}: read failed at offset {offset}: {exc}") from exc
        if len(data) != length:
            raise SourceError(f"{self.path}: short read at offset {offset} (the disk shrank?)")
        return data

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset``: O_DIRECT when ``buf`` is page-aligned memory (a view of an
        mmap) and the range is block-aligned, an ordinary read otherwise. Thread-safe."""
        length = len(buf)
        aligned = self._direct_fd >= 0 and offset % ALIGN == 0 and length % ALIGN == 0
        fd = self._direct_fd if aligned else self._fd
        done = 0
        try:
            while done < length:
                try:
                    n = os.preadv(fd, [buf[done:]], offset + done)
                except OSError as exc:
                    if exc.errno != errno.EINVAL or fd == self._fd:
                        raise
                    fd = self._fd  # the memory was not aligned after all: read through the cache
                    continue
                if n <= 0:
                    break
                done += n
        except OSError as exc:
            raise SourceError(f"{self.path}: read failed at offset {offset}: {exc}") from exc
        if done != length:
            raise SourceError(f"{self.path}: short read at offset {offset} (the disk shrank?)")

    def close(self) -> None:
        os.close(self._fd)
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1


def _direct_write(fd: int, data: memoryview, offset: int, what: str) -> bool:
    """Write ``data`` through the O_DIRECT ``fd``; False if its memory is not suitably aligned."""
    try:
        n = os.pwrite(fd, data, offset)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            pwrite_all(fd, data, offset, what)  # raises the storage error with the usual message
        return False
    if n < len(data):
        pwrite_all(fd, data[n:], offset + n, what)
    return True


DIRECT_WRITE_MIN = 64 << 10


class RawTarget:
    """A raw file created sparse (``fresh``), or an existing file/device overwritten in place.

    Block-aligned chunks go through O_DIRECT from a per-thread page-aligned
    buffer (see vault/directio.py for why); anything unaligned, and
    filesystems without O_DIRECT, use ordinary writes.
    """

    format = "raw"
    takes_views = True

    def __init__(self, path: str, size: int, *, fresh: bool) -> None:
        self.path = path
        self.fresh = fresh
        flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if fresh else 0)
        self._fd = os.open(path, flags, 0o644)
        if fresh:
            os.ftruncate(self._fd, size)
        self._direct_fd, direct = open_direct(path, os.O_WRONLY | os.O_CLOEXEC)
        if not direct:
            os.close(self._direct_fd)
            self._direct_fd = -1
        self._local = threading.local()
        self._buffers: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def _aligned(self, size: int) -> mmap.mmap:
        buf: mmap.mmap | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            buf = anonymous_map(max(size, 1 << 20))
            self._local.buf = buf
            with self._lock:
                self._buffers.append(buf)
        return buf

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        n = len(data)
        # Small writes go through the page cache: scattered 4 KiB O_DIRECT writes (a layered restore's)
        # each waited on the device, ~5,500 a second here; the kernel batches buffered ones until flush.
        if self._direct_fd >= 0 and n >= DIRECT_WRITE_MIN and offset % ALIGN == 0 and n % ALIGN == 0:
            # A view is often of the caller's own page-aligned buffer: written as it is, without a copy
            # (the kernel says EINVAL if its memory is not aligned after all; then it is copied).
            if isinstance(data, memoryview) and _direct_write(self._direct_fd, data, offset, self.path):
                return
            buf = self._aligned(n)
            buf[:n] = data
            pwrite_all(self._direct_fd, memoryview(buf)[:n], offset, self.path)
        else:
            pwrite_all(self._fd, data, offset, self.path)

    def write_zeroes(self, offset: int, length: int) -> None:
        if self.fresh:
            return
        zero = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(zero), end - offset)
            self.pwrite(zero[:n], offset)
            offset += n

    def flush(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        for fd in (self._fd, self._direct_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._direct_fd = -1
        with self._lock:
            for buf in self._buffers:
                buf.close()
            self._buffers.clear()
