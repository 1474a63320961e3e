"""Raw images and block devices, read with pread and written sparsely."""

from __future__ import annotations

import errno
import os
import stat

from raksha.domain.errors import SourceError, StorageFull
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
    """A raw file created sparse (``fresh``), or an existing file/device overwritten in place."""

    format = "raw"

    def __init__(self, path: str, size: int, *, fresh: bool) -> None:
        self.path = path
        self.fresh = fresh
        flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if fresh else 0)
        self._fd = os.open(path, flags, 0o644)
        if fresh:
            os.ftruncate(self._fd, size)

    def pwrite(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(f"{self.path}: no space left while restoring") from exc
            raise SourceError(f"{self.path}: write failed at offset {offset}: {exc}") from exc

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
        os.close(self._fd)
