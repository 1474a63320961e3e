"""Vault locks: plaintext JSON objects ``locks/<lock-id>`` in the backend.

SHARED locks (backup, restore, verify, deleting one backup) coexist with each
other and with one MAINTENANCE lock (gc, prune); EXCLUSIVE conflicts with all.
Acquiring is optimistic: write our own lock, then look at the others and back
off if one conflicts, so two racing acquirers may both back off but never
both succeed. A holder refreshes its lock periodically; a lock not refreshed
within ``stale_after`` seconds, or held by a dead process on this host, is
stale and is removed by the next acquirer.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType
from typing import Any

from raksha.domain.errors import InvalidInput, NotFound, PermanentError, RakshaError, VaultLocked
from raksha.vault.backends.base import Backend
from raksha.vault.processes import owner_alive

PREFIX = "locks/"
VERSION = 1
# Only these keys can be locks; gc's ``locks/<id>.condemned`` files and other junk are never read.
_KEY_RE = re.compile(r"^locks/([0-9a-f]{32})$")


class LockKind(Enum):
    SHARED = "shared"
    MAINTENANCE = "maintenance"
    EXCLUSIVE = "exclusive"


def conflicts(a: LockKind, b: LockKind) -> bool:
    if LockKind.EXCLUSIVE in (a, b):
        return True
    return a is LockKind.MAINTENANCE and b is LockKind.MAINTENANCE


@dataclass(frozen=True)
class LockInfo:
    key: str
    id: str
    kind: LockKind
    operation: str
    host: str
    pid: int
    created: float
    refreshed: float
    extra: dict[str, Any] = field(hash=False)

    @classmethod
    def parse(cls, key: str, data: bytes) -> LockInfo | None:
        """The lock stored as ``data`` under ``key``, or None if it is not a valid lock."""
        m = _KEY_RE.match(key)
        try:
            doc = json.loads(data)
            if not (m and isinstance(doc, dict) and doc.get("version") == VERSION and doc["id"] == m[1]):
                return None
            info = cls(key, doc["id"], LockKind(doc["kind"]), doc["operation"], doc["host"], doc["pid"],
                       doc["created"], doc["refreshed"], doc["extra"])
        except (ValueError, KeyError, TypeError, RecursionError):
            return None
        ok = (isinstance(info.operation, str) and isinstance(info.host, str) and isinstance(info.extra, dict)
              and type(info.pid) is int and info.pid > 0
              and all(type(t) in (int, float) for t in (info.created, info.refreshed)))
        return info if ok else None

    def to_json(self) -> bytes:
        doc = {"version": VERSION, "id": self.id, "kind": self.kind.value, "operation": self.operation,
               "host": self.host, "pid": self.pid, "created": self.created, "refreshed": self.refreshed,
               "extra": self.extra}
        return json.dumps(doc, sort_keys=True).encode()

    def describe(self, now: float) -> str:
        return (f"{self.kind.value} lock {self.id} for {self.operation!r} held by pid {self.pid} "
                f"on {self.host}, taken {now - self.created:.0f}s ago")


class LockManager:
    """Takes and inspects the locks of one vault on behalf of this process (``host``, ``pid``)."""

    def __init__(self, backend: Backend, *, host: str | None = None, pid: int | None = None,
                 stale_after: float = 1800.0, refresh_interval: float = 300.0,
                 clock: Callable[[], float] = time.time) -> None:
        if not 0 < refresh_interval < stale_after:
            # Refreshing less often than the staleness limit would let others break live locks.
            raise InvalidInput("need 0 < refresh_interval < stale_after", code="LOCK_CONFIG_INVALID",
                               refresh_interval=refresh_interval, stale_after=stale_after)
        self.backend = backend
        self.host = socket.gethostname() if host is None else host
        self.pid = os.getpid() if pid is None else pid
        self.stale_after = stale_after
        self.refresh_interval = refresh_interval
        self.clock = clock

    def is_stale(self, info: LockInfo) -> bool:
        if self.clock() - info.refreshed > self.stale_after:
            return True
        return info.host == self.host and not owner_alive(info.pid, info.created)

    def _read_all(self, skip: str = "") -> list[LockInfo]:
        # Materialise the listing first: we may delete while going through it.
        keys = sorted(o.key for o in self.backend.list(PREFIX) if o.key != skip and _KEY_RE.match(o.key))
        found = []
        for key in keys:
            try:
                info = LockInfo.parse(key, self.backend.get(key))
            except NotFound:
                continue  # released between list and get
            if info is not None:
                found.append(info)
        return found

    def active(self, kinds: Iterable[LockKind] | None = None) -> list[LockInfo]:
        """The live (non-stale) locks, oldest first; read-only, nothing is removed."""
        wanted = set(LockKind if kinds is None else kinds)
        live = [i for i in self._read_all() if i.kind in wanted and not self.is_stale(i)]
        return sorted(live, key=lambda i: (i.created, i.id))

    def acquire(self, kind: LockKind, operation: str, extra: Mapping[str, Any] | None = None) -> Lock:
        """Take a ``kind`` lock or raise ``VaultLocked`` naming a live conflicting holder."""
        lock_id, now = os.urandom(16).hex(), self.clock()
        info = LockInfo(PREFIX + lock_id, lock_id, kind, operation, self.host, self.pid, now, now,
                        dict(extra or {}))
        self.backend.put(info.key, info.to_json())  # put-if-absent: a random id never collides in practice
        try:
            blocking = []
            for other in self._read_all(skip=info.key):
                if self.is_stale(other):
                    with contextlib.suppress(RakshaError):  # best effort; another acquirer may race us
                        self.backend.delete(other.key)
                elif conflicts(kind, other.kind):
                    blocking.append(other)
        except BaseException:
            with contextlib.suppress(RakshaError):
                self.backend.delete(info.key)
            raise
        if blocking:
            with contextlib.suppress(RakshaError):
                self.backend.delete(info.key)
            holder = min(blocking, key=lambda i: (i.created, i.id))
            now = self.clock()
            raise VaultLocked(
                f"cannot take a {kind.value} lock for {operation!r} in {self.backend.url}: "
                f"{holder.describe(now)}",
                lock_id=holder.id, kind=holder.kind.value, operation=holder.operation, host=holder.host,
                pid=holder.pid, age=round(now - holder.created, 1), wanted=kind.value,
            )
        return Lock(self, info)


class Lock:
    """A held lock. Use as a context manager, or call ``release()``."""

    def __init__(self, manager: LockManager, info: LockInfo) -> None:
        self._manager = manager
        self._info = info
        self._mutex = threading.Lock()  # keeps a refresh from rewriting the object after release
        self._released = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresher, name=f"raksha-lock-{info.id[:8]}",
                                        daemon=True)
        self._thread.start()

    @property
    def info(self) -> LockInfo:
        return self._info

    @property
    def key(self) -> str:
        return self._info.key

    @property
    def released(self) -> bool:
        return self._released

    def held_in(self, manager: LockManager, kind: LockKind) -> bool:
        """Whether this is a ``kind`` lock of ``manager``'s vault, not released."""
        return not self._released and self._manager.backend is manager.backend and self._info.kind is kind

    def _write(self, extra: dict[str, Any]) -> None:
        with self._mutex:
            if self._released:
                return
            info = self._info
            new = LockInfo(info.key, info.id, info.kind, info.operation, info.host, info.pid, info.created,
                           self._manager.clock(), extra)
            self._manager.backend.put(new.key, new.to_json(), overwrite=True)
            self._info = new

    def refresh(self) -> None:
        """Rewrite the lock with a new ``refreshed`` time; a no-op once released."""
        self._write(self._info.extra)

    def update_extra(self, extra: Mapping[str, Any]) -> None:
        """Merge ``extra`` into the lock's extra data and rewrite it (also refreshing it)."""
        if self._released:
            raise PermanentError(f"lock {self._info.id} has been released", code="LOCK_RELEASED")
        self._write({**self._info.extra, **extra})

    def release(self) -> None:
        """Delete the lock object and stop refreshing; safe to call more than once."""
        self._stop.set()
        try:
            with self._mutex:
                if not self._released:
                    self._manager.backend.delete(self._info.key)
                    self._released = True  # only now: if delete failed, release() can be retried
        finally:
            if self._thread is not threading.current_thread():
                self._thread.join()

    def _refresher(self) -> None:
        while not self._stop.wait(self._manager.refresh_interval):
            with contextlib.suppress(RakshaError):  # transient failure: try again next interval
                self.refresh()

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Lock({self._info.kind.value}, {self._info.operation!r}, key={self._info.key!r})"
