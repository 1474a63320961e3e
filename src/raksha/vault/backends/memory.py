"""An in-memory vault backend, for tests and ``memory://NAME`` vaults.

Same semantics and errors as the local backend: put-if-absent is atomic, keys
are checked the same way (``tmp/`` is reserved there, so it is here too) and
``put_file`` consumes the staged file.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from raksha.domain.errors import AlreadyExists, BackendError, InvalidInput, NotFound
from raksha.vault.backends.base import ObjectInfo
from raksha.vault.backends.local import check_object_key


class MemoryBackend:
    """Objects in a dict of key -> (bytes, mtime), guarded by a lock."""

    _named: ClassVar[dict[str, MemoryBackend]] = {}
    _named_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, name: str | None = None) -> None:
        self._name = name
        self._objects: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()
        self._staging: Path | None = None

    @classmethod
    def named(cls, name: str) -> MemoryBackend:
        """The process-wide instance for ``memory://NAME``: every open shares its objects."""
        with cls._named_lock:
            if name not in cls._named:
                cls._named[name] = cls(name)
            return cls._named[name]

    @property
    def url(self) -> str:
        if self._name is not None:
            return f"memory://{self._name}"
        return f"<anonymous memory backend {id(self):x}>"  # not reopenable, so not a URL

    def __repr__(self) -> str:
        return f"MemoryBackend({self.url!r})"

    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> None:
        check_object_key(key)
        data = bytes(data)  # a caller's bytearray must not change the stored object later
        with self._lock:
            if not overwrite and key in self._objects:
                raise AlreadyExists(
                    f"object {key!r} already exists in {self.url}", code="OBJECT_EXISTS", key=key
                )
            self._objects[key] = (data, time.time())

    def put_file(self, key: str, path: Path, *, overwrite: bool = False) -> None:
        try:
            check_object_key(key)
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise BackendError(
                    f"cannot read staged file for {key!r} ({path}): {exc.strerror}", key=key
                ) from exc
            self.put(key, data, overwrite=overwrite)
        finally:
            Path(path).unlink(missing_ok=True)  # consumed whatever happened

    def get(self, key: str) -> bytes:
        return self._entry(key)[0]

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise InvalidInput(f"invalid range {offset}+{length} for {key!r}", code="INVALID_RANGE")
        return self._entry(key)[0][offset : offset + length]

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._lock:  # snapshot, so callers may delete while iterating
            found = [ObjectInfo(k, len(d), m) for k, (d, m) in self._objects.items() if k.startswith(prefix)]
        yield from found

    def delete(self, key: str) -> bool:
        check_object_key(key)
        with self._lock:
            return self._objects.pop(key, None) is not None

    def stat(self, key: str) -> ObjectInfo:
        data, mtime = self._entry(key)
        return ObjectInfo(key, len(data), mtime)

    def staging_dir(self) -> Path:
        with self._lock:
            if self._staging is None:
                self._staging = Path(tempfile.mkdtemp(prefix="raksha-memory-"))
                # Removed when this backend is collected or the process exits.
                weakref.finalize(self, shutil.rmtree, self._staging, ignore_errors=True)
            return self._staging

    def close(self) -> None:
        pass  # named instances outlive any one user; objects stay until the process ends

    def _entry(self, key: str) -> tuple[bytes, float]:
        check_object_key(key)
        with self._lock:
            entry = self._objects.get(key)
        if entry is None:
            raise NotFound(f"object {key!r} not found in {self.url}", code="OBJECT_NOT_FOUND", key=key)
        return entry
