"""The object-store protocol every vault backend implements.

The vault needs only these verbs, so an object store (Swift, S3) fits as
well as a directory: put-if-absent, get, ranged get, list by prefix, delete,
stat. Keys are ``/``-separated relative paths such as ``data/ab/abcd...``.

Errors raised by backends are Raksha errors: ``NotFound`` (code
``OBJECT_NOT_FOUND``) for a missing object, ``AlreadyExists`` (code
``OBJECT_EXISTS``) when a put-if-absent finds the key taken, ``StorageFull``
when the medium is full and ``BackendError`` (retryable) for other I/O
failures.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

from raksha.domain.errors import InvalidInput

_KEY_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


class ObjectInfo(NamedTuple):
    # Not a dataclass: this module is on every CLI command's path to starting its key derivation.
    key: str
    size: int
    mtime: float  # seconds since the epoch, as the backend reports it


def check_key(key: str) -> str:
    """Reject keys that could escape the vault or that an object store would mangle."""
    if not _KEY_RE.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise InvalidInput(f"invalid object key {key!r}", code="INVALID_KEY")
    return key


@runtime_checkable
class Backend(Protocol):
    """A flat namespace of immutable-by-convention objects."""

    @property
    def url(self) -> str:
        """Where this backend stores its objects, for messages and records."""
        ...

    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> None:
        """Store ``data`` under ``key`` atomically and durably.

        Without ``overwrite`` the put is put-if-absent: if the key exists,
        ``AlreadyExists`` is raised and the stored object is untouched.
        """
        ...

    def put_file(self, key: str, path: Path, *, overwrite: bool = False) -> None:
        """Store the file at ``path`` (in ``staging_dir()``) under ``key``; the file is consumed."""
        ...

    def get(self, key: str) -> bytes: ...

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Return ``length`` bytes from ``offset``; fewer only if the object is shorter."""
        ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in no particular order."""
        ...

    def delete(self, key: str) -> bool:
        """Delete ``key``; return False if it did not exist."""
        ...

    def stat(self, key: str) -> ObjectInfo: ...

    def staging_dir(self) -> Path:
        """A local directory where large objects are assembled before ``put_file``."""
        ...

    def close(self) -> None: ...


def open_backend(url: str, *, create: bool = False) -> Backend:
    """Open the backend named by ``url``: a directory path, ``file://PATH`` or ``memory://NAME``."""
    if url.startswith("memory://"):
        from raksha.vault.backends.memory import MemoryBackend

        return MemoryBackend.named(url[len("memory://") :])
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" in url:
        raise InvalidInput(f"unsupported vault URL scheme in {url!r}", code="VAULT_URL_UNSUPPORTED")
    from raksha.vault.backends.local import LocalBackend

    return LocalBackend(Path(url), create=create)
