"""Raw images and block devices, read with pread and written sparsely."""

from __future__ import annotations

import errno
import mmap
import os
import stat
import threading

from raksha.domain.errors import SourceError
from raksha.vault.directio import ALIGN, open_direct, pwrite_all
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

    def data_extents(self) -> list[Extent]:
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

    def close(self) -> None:
        os.close(self._fd)


class RawTarget:
    """A raw file created sparse (``fresh``), or an existing file/device overwritten in place.

    Block-aligned chunks go through O_DIRECT from a per-thread page-aligned
    buffer (see vault/directio.py for why); anything unaligned, and
    filesystems without O_DIRECT, use ordinary writes.
    """

    format = "raw"

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
            buf = mmap.mmap(-1, max(size, 1 << 20))
            self._local.buf = buf
            with self._lock:
                self._buffers.append(buf)
        return buf

    def pwrite(self, data: bytes, offset: int) -> None:
        n = len(data)
        if self._direct_fd >= 0 and offset % ALIGN == 0 and n % ALIGN == 0:
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
