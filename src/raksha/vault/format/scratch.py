"""Unnamed temporary files for what a backup or restore keeps out of memory (a large disk's ids).

In ``$TMPDIR`` (``tempfile.gettempdir()``), gone with the process however it ends. Errors are the
vault's: a full filesystem is STORAGE_FULL naming the directory, any other failure BACKEND_IO.
"""

from __future__ import annotations

import errno
import os
import tempfile
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
