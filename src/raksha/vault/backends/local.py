"""A vault backend over a local (or NFS-mounted) directory.

Objects live at ``root/<key>``. Writes go to ``root/tmp/<random>.partial``
first and are fsynced before they become visible, so a reader never sees a
half-written object and a crash leaves at most an unlisted partial behind.
Put-if-absent uses ``link(2)``, which fails atomically if the name is taken.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import stat as stat_mod
from collections.abc import Callable, Iterator
from pathlib import Path

from raksha.domain.errors import AlreadyExists, BackendError, InvalidInput, NotFound, RakshaError, StorageFull
from raksha.vault.backends.base import ObjectInfo, check_key
from raksha.vault.directio import pread_direct, pread_into

DIRECT_READ_MIN = 64 << 10  # blobs; small reads (headers, locks) stay buffered

STAGING = "tmp"  # top-level directory for partials; never an object key
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")  # one key component, as check_key allows
_NOT_THERE = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)  # a directory is not an object
_FULL = (errno.ENOSPC, errno.EDQUOT)
_DIR = os.O_RDONLY | os.O_DIRECTORY


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_object_key(key: str) -> str:
    """check_key, plus: ``tmp/`` holds partials here, so no backend accepts it as a key."""
    check_key(key)
    if key.split("/", 1)[0] == STAGING:
        raise InvalidInput(f"invalid object key {key!r}: {STAGING}/ is reserved", code="INVALID_KEY")
    return key


class LocalBackend:
    """The Backend protocol over a directory tree."""

    def __init__(self, root: Path, *, create: bool = False) -> None:
        self._root = Path(root)
        if create:
            try:
                self._root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise self._error(str(self._root), exc, "create vault directory") from exc
        elif not self._root.is_dir():
            raise NotFound(f"no vault directory at {self._root}", code="VAULT_NOT_FOUND", path=str(root))
        self._tmp = self._root / STAGING

    @property
    def url(self) -> str:
        return str(self._root)

    def __repr__(self) -> str:
        return f"LocalBackend({str(self._root)!r})"

    # -- writing --------------------------------------------------------------

    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> None:
        check_object_key(key)
        tmp = self.staging_dir() / f"{os.urandom(12).hex()}.partial"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            _unlink_quietly(tmp)
            raise self._error(key, exc, "store") from exc
        self._publish(key, tmp, overwrite)

    def put_file(self, key: str, path: Path, *, overwrite: bool = False) -> None:
        try:
            check_object_key(key)
            try:
                _fsync(path)
            except OSError as exc:
                raise self._error(key, exc, "store") from exc
            self._publish(key, Path(path), overwrite)
        finally:
            _unlink_quietly(Path(path))  # consumed whatever happened

    def _publish(self, key: str, tmp: Path, overwrite: bool) -> None:
        """Give the fsynced file ``tmp`` the name ``key``; ``tmp`` is gone afterwards."""
        final = self._root / key
        op: Callable[[Path, Path], None] = os.replace if overwrite else os.link
        try:
            top: Path | None = None  # the highest directory that already held the new ones we made
            for attempt in range(3):
                try:
                    op(tmp, final)
                    break
                except FileNotFoundError:
                    # Parent missing (or pruned by a concurrent delete): create it and retry.
                    if attempt == 2 or not tmp.exists():
                        raise
                    held = final.parent
                    while held != self._root and not held.exists():
                        held = held.parent
                    if top is None or held in top.parents:
                        top = held
                    final.parent.mkdir(parents=True, exist_ok=True)
            # fsync the directory to make the new entry durable; a new directory's entry is in its parent,
            # so the parents of those made here need theirs too (and none above: their entries are old).
            _fsync(final.parent, _DIR)
            if top is not None:
                for parent in final.parent.parents:
                    _fsync(parent, _DIR)
                    if parent == top or parent == self._root:
                        break
        except FileExistsError as exc:
            raise AlreadyExists(
                f"object {key!r} already exists in {self._root}", code="OBJECT_EXISTS", key=key
            ) from exc
        except OSError as exc:
            raise self._error(key, exc, "store") from exc
        finally:
            _unlink_quietly(tmp)  # after link the partial is a second name; after replace it is gone

    def delete(self, key: str) -> bool:
        # Not fsynced: a delete undone by a crash is simply redone by the next GC.
        check_object_key(key)
        path = self._root / key
        try:
            os.unlink(path)
        except OSError as exc:
            if exc.errno in _NOT_THERE:
                return False
            raise self._error(key, exc, "delete") from exc
        # Prune now-empty directories, keeping the top-level ones (data/, index/, ...).
        parent = path.parent
        while parent.parent != self._root and parent != self._root:
            try:
                os.rmdir(parent)
            except OSError:
                break  # not empty, or a concurrent put refilled it
            parent = parent.parent
        return True

    # -- reading --------------------------------------------------------------

    def get(self, key: str) -> bytes:
        check_object_key(key)
        try:
            with open(self._root / key, "rb") as f:
                return f.read()
        except OSError as exc:
            raise self._error(key, exc, "read", reading=True) from exc

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        check_object_key(key)
        if offset < 0 or length < 0:
            raise InvalidInput(f"invalid range {offset}+{length} for {key!r}", code="INVALID_RANGE")
        try:
            if length >= DIRECT_READ_MIN:
                data = pread_direct(self._root / key, offset, length)
                if data is not None:
                    return data
            fd = os.open(self._root / key, os.O_RDONLY)
            try:
                parts: list[bytes] = []
                while length > 0:  # pread may return less than asked before EOF (huge lengths)
                    chunk = os.pread(fd, length, offset)
                    if not chunk:
                        break
                    parts.append(chunk)
                    offset += len(chunk)
                    length -= len(chunk)
                return b"".join(parts)
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._error(key, exc, "read", reading=True) from exc

    def get_range_into(self, key: str, offset: int, length: int, buf: mmap.mmap) -> memoryview:
        """``get_range`` into the page-aligned ``buf`` (``directio.aligned_span(offset, length)`` bytes
        or more): a view of ``buf``, valid until it is reused. Not part of the Backend protocol; the
        engine uses it where a backend has it, so restores allocate nothing per blob."""
        check_object_key(key)
        if offset < 0 or length < 0:
            raise InvalidInput(f"invalid range {offset}+{length} for {key!r}", code="INVALID_RANGE")
        try:
            return pread_into(self._root / key, offset, length, buf)
        except OSError as exc:
            raise self._error(key, exc, "read", reading=True) from exc

    def stat(self, key: str) -> ObjectInfo:
        check_object_key(key)
        try:
            st = os.stat(self._root / key)
        except OSError as exc:
            raise self._error(key, exc, "stat", reading=True) from exc
        if not stat_mod.S_ISREG(st.st_mode):
            raise self._error(key, IsADirectoryError(errno.EISDIR, "not a file"), "stat", reading=True)
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Start at the deepest directory the prefix names fully; the rest ("ab" in
        # "index/ab") is matched while walking, so a prefix may end mid-name.
        base = prefix.rpartition("/")[0]
        parts = base.split("/") if base else []
        if parts[:1] == [STAGING] or not all(_NAME_RE.fullmatch(p) and p not in (".", "..") for p in parts):
            return  # no valid key can start with this prefix
        try:
            yield from self._walk(base, prefix)
        except OSError as exc:
            raise self._error(prefix, exc, "list") from exc

    def _walk(self, rel: str, prefix: str) -> Iterator[ObjectInfo]:
        try:
            entries = os.scandir(self._root / rel)
        except (FileNotFoundError, NotADirectoryError):
            return
        with entries:
            for entry in entries:
                if not _NAME_RE.fullmatch(entry.name) or (not rel and entry.name == STAGING):
                    continue  # partials and foreign files are not objects
                key = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    # Descend only where keys can match: "index/ab" needs index/ but not data/.
                    if key.startswith(prefix) or prefix.startswith(key + "/"):
                        yield from self._walk(key, prefix)
                elif key.startswith(prefix) and entry.is_file(follow_symlinks=False):
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # deleted while we walked
                    yield ObjectInfo(key, st.st_size, st.st_mtime)

    # -- misc -----------------------------------------------------------------

    def staging_dir(self) -> Path:
        # Same filesystem as the objects, so put_file can link instead of copy.
        try:
            self._tmp.mkdir(exist_ok=True)
        except OSError as exc:
            raise self._error(STAGING, exc, "create staging directory") from exc
        return self._tmp

    def close(self) -> None:
        pass

    def _error(self, key: str, exc: OSError, action: str, *, reading: bool = False) -> RakshaError:
        why = exc.strerror or str(exc)
        if reading and exc.errno in _NOT_THERE:
            return NotFound(
                f"object {key!r} not found in {self._root}: {why}", code="OBJECT_NOT_FOUND", key=key
            )
        if exc.errno in _FULL:
            return StorageFull(f"cannot {action} {key!r} in {self._root}: {why}", key=key)
        return BackendError(f"cannot {action} {key!r} in {self._root}: {why}", key=key)
