"""Disks behind an NBD export: qcow2 and other formats via qemu-nbd, and (later) libvirt's pull backups.

libnbd serialises the calls of one handle, so every thread gets its own
connection to the export; qemu-nbd is started with ``--shared=0`` for that.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raksha.domain.errors import ImageInvalid, SourceError, StorageFull
from raksha.vault.processes import alive, owner_alive, remove_dirs_of_dead_owners, started_at
from raksha.vault.sources.base import ExtentArray

_MAX_STATUS = 1 << 30
# + "<pid>-": the socket directory of a qemu-nbd export tells which process started it (and whether it died).
EXPORT_DIR_PREFIX = "raksha-nbd-"
BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1
STATE_ZERO = 2


def _nbd() -> Any:
    try:
        import nbd
    except ImportError as exc:  # pragma: no cover - setup.sh installs it
        raise ImageInvalid("reading this image format needs libnbd (Debian package python3-libnbd)") from exc
    return nbd


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


_EXPORT_OWNER = re.compile(r"--socket=.*/" + re.escape(EXPORT_DIR_PREFIX) + r"(\d+)-")
_EXPORT_DIR = re.compile(re.escape(EXPORT_DIR_PREFIX) + r"(\d+)-")


def end_stale_exports(paths: set[str] | None = None) -> list[int]:
    """Stop the qemu-nbd exports a Raksha process that died (SIGKILL, a crash) left running (of ``paths``
    only, if given), and remove the directories such processes left. Returns the pids stopped.

    ``--persistent`` keeps an export running without its owner: it held the image open (a restore's
    partial file, gone from the directory but not from the disk) and its lock (the snapshot strategy's
    block commits could not write the layers it read). Only an export whose socket lies in a dead
    process's directory is touched."""
    stopped = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if not argv or os.path.basename(argv[0]) != "qemu-nbd" or (paths is not None and argv[-1] not in paths):
            continue
        owner = next((m for m in map(_EXPORT_OWNER.match, argv) if m), None)
        # The owner started the export, so it started before it: a younger process with its pid is another.
        if owner is None or owner_alive(int(owner.group(1)), started_at(int(entry)) or time.time()):
            continue
        try:
            os.kill(int(entry), signal.SIGTERM)
        except ProcessLookupError:
            continue
        stopped.append(int(entry))
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in stopped) and time.monotonic() < deadline:
        time.sleep(0.02)
    if paths is None:
        remove_dirs_of_dead_owners(tempfile.gettempdir(), _EXPORT_DIR)
    return stopped


class QemuNbdExport:
    """A qemu-nbd process exporting one image on a private unix socket."""

    def __init__(self, path: str, fmt: str, *, writable: bool = False, bitmap: str | None = None) -> None:
        if shutil.which("qemu-nbd") is None:
            raise ImageInvalid("reading this image format needs qemu-nbd (Debian package qemu-utils)")
        end_stale_exports()  # those of Raksha processes that died: nobody else ends them
        self._dir = tempfile.mkdtemp(prefix=f"{EXPORT_DIR_PREFIX}{os.getpid()}-")
        self.socket = os.path.join(self._dir, "nbd.sock")
        cmd = ["qemu-nbd", "--persistent", "--shared=0", f"--socket={self.socket}", f"--format={fmt}",
               "--cache=writeback" if writable else "--cache=none", "--aio=threads"]
        if writable:
            cmd.append("--discard=unmap")
        else:
            cmd.append("--read-only")
        if bitmap is not None:  # offered as the meta context qemu:dirty-bitmap:<bitmap>
            cmd.append(f"--bitmap={bitmap}")
        self._proc = subprocess.Popen([*cmd, path], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        # The socket file appears at bind(), a moment before listen(): wait until a connection is accepted.
        while not _listening(self.socket):
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace").strip() if self._proc.stderr else ""
                shutil.rmtree(self._dir, ignore_errors=True)
                raise ImageInvalid(f"{path}: qemu-nbd cannot open it as {fmt}: {err}")
            if time.monotonic() > deadline:
                self.close()
                raise SourceError(f"{path}: qemu-nbd did not start within 10 s")
            time.sleep(0.01)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


class _Connections:
    """One libnbd handle per thread, all to the same export."""

    def __init__(self, socket: str, export_name: str = "", contexts: tuple[str, ...] = (BASE_ALLOCATION,)) -> None:
        self._socket = socket
        self._export_name = export_name
        self._contexts = contexts
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self.first = self.get()

    def get(self) -> Any:
        h = getattr(self._local, "h", None)
        if h is None:
            nbd = _nbd()
            h = nbd.NBD()
            for context in self._contexts:
                h.add_meta_context(context)
            if self._export_name:
                h.set_export_name(self._export_name)
            h.connect_unix(self._socket)
            self._local.h = h
            with self._lock:
                self._all.append(h)
        return h

    def close(self) -> None:
        with self._lock:
            for h in self._all:
                try:
                    h.shutdown()
                except Exception:
                    pass
            self._all.clear()


class NbdSource:
    """A disk behind an NBD export: qemu-nbd's for image files, libvirt's for a running VM's pull backup.

    ``dirty_bitmap`` names the export's dirty-bitmap context (libvirt's is
    ``qemu:dirty-bitmap:backup-<disk>``) for ``dirty_extents()``.
    """

    def __init__(self, socket: str, *, path: str, fmt: str, export: QemuNbdExport | None = None,
                 export_name: str = "", dirty_bitmap: str | None = None) -> None:
        self.path = path
        self.format = fmt
        self._export = export
        self._bitmap = dirty_bitmap
        contexts = (BASE_ALLOCATION,) + ((dirty_bitmap,) if dirty_bitmap else ())
        try:
            self._conns = _Connections(socket, export_name, contexts)
        except Exception as exc:
            self.close()
            raise SourceError(f"{path}: cannot connect to its NBD export: {exc}") from exc
        self.virtual_size = int(self._conns.first.get_size())

    def data_extents(self) -> ExtentArray:
        """Extents not known to read as zeros (base:allocation without the zero flag)."""
        if not self._conns.first.can_meta_context(BASE_ALLOCATION):
            return ExtentArray([(0, self.virtual_size)])
        return self._extents(BASE_ALLOCATION, lambda flags: not flags & STATE_ZERO)

    def dirty_extents(self) -> ExtentArray:
        """Extents the dirty bitmap marks as written since its checkpoint."""
        if self._bitmap is None or not self._conns.first.can_meta_context(self._bitmap):
            raise SourceError(f"{self.path}: the export offers no dirty bitmap {self._bitmap!r}")
        return self._extents(self._bitmap, lambda flags: bool(flags & 1))

    def _extents(self, context: str, wanted: Callable[[int], bool]) -> ExtentArray:
        h = self._conns.first
        out = ExtentArray()
        pos = 0
        while pos < self.virtual_size:
            found: list[int] = []

            def cb(metacontext: str, offset: int, entries: list[int], err: Any, found: list[int] = found) -> int:
                if metacontext == context:
                    found.extend(entries)
                return 0

            h.block_status(min(_MAX_STATUS, self.virtual_size - pos), pos, cb)
            if not found:
                raise SourceError(f"{self.path}: the NBD server returned no {context} status at {pos}")
            for i in range(0, len(found), 2):
                length, flags = found[i], found[i + 1]
                length = min(length, self.virtual_size - pos)
                if wanted(flags):
                    out.append_joined(pos, length)
                pos += length
        return out

    def pread(self, offset: int, length: int) -> bytes:
        try:
            return bytes(self._conns.get().pread(length, offset))
        except Exception as exc:
            raise SourceError(f"{self.path}: NBD read failed at offset {offset}: {exc}") from exc

    def close(self) -> None:
        if hasattr(self, "_conns"):
            self._conns.close()
        if self._export is not None:
            self._export.close()


class NbdInPlace:
    """An existing image written in place through a writable qemu-nbd: what is not written stays as it
    was, and the image's enabled persistent dirty bitmaps record every write (QEMU does it), so the
    checkpoints they belong to still say what changed since. ``bitmap`` names one of them to read with
    ``dirty_extents()``, before anything is written."""

    fresh = False
    takes_views = False

    def __init__(self, path: str, fmt: str, *, bitmap: str | None = None) -> None:
        self.path = path
        self.format = fmt
        self._bitmap = bitmap
        self._export = QemuNbdExport(path, fmt, writable=True, bitmap=bitmap)
        try:
            self._conns = _Connections(self._export.socket)
        except Exception as exc:
            self._export.close()
            raise SourceError(f"{path}: cannot connect to its NBD export: {exc}") from exc
        self.virtual_size = int(self._conns.first.get_size())

    def dirty_extents(self) -> ExtentArray:
        """The extents ``bitmap`` marks as written since its checkpoint."""
        if self._bitmap is None:
            raise SourceError(f"{self.path}: no dirty bitmap was asked for")
        source = NbdSource(self._export.socket, path=self.path, fmt=self.format,
                           dirty_bitmap=f"qemu:dirty-bitmap:{self._bitmap}")
        try:
            return source.dirty_extents()
        finally:
            source.close()

    def pwrite(self, data: bytes, offset: int) -> None:
        try:
            self._conns.get().pwrite(data, offset)
        except Exception as exc:
            if "No space" in str(exc):
                raise StorageFull(f"{self.path}: no space left while restoring") from exc
            raise SourceError(f"{self.path}: NBD write failed at offset {offset}: {exc}") from exc

    def write_zeroes(self, offset: int, length: int) -> None:
        try:
            self._conns.get().zero(length, offset)  # may leave a hole: it reads as zeros either way
        except Exception as exc:
            raise SourceError(f"{self.path}: NBD write of zeroes failed at offset {offset}: {exc}") from exc

    def flush(self) -> None:
        self._conns.first.flush()

    def close(self) -> None:
        """Ends qemu-nbd gracefully: it writes the bitmaps back into the image as it exits."""
        self._conns.close()
        self._export.close()

    def commit(self) -> None:
        pass

    def discard(self) -> None:
        pass


class NbdTarget(NbdInPlace):
    """A fresh image in any qemu format, written through qemu-nbd."""

    fresh = True

    def __init__(self, path: str, fmt: str, size: int) -> None:
        if os.path.exists(path):
            raise FileExistsError(path)
        res = subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, str(size)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise SourceError(f"{path}: qemu-img create failed: {res.stderr.strip()}")
        super().__init__(path, fmt)

    def write_zeroes(self, offset: int, length: int) -> None:
        return  # a new image reads as zeros
