"""Open what the user named as a source or a target, with clear errors for everything else."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess

from raksha.domain.errors import AlreadyExists, ImageInvalid, InvalidInput, NotFound
from raksha.vault.sources.base import DiskSource, DiskTarget
from raksha.vault.sources.nbd import NbdSource, NbdTarget, QemuNbdExport
from raksha.vault.sources.raw import RawSource, RawTarget

QCOW2_MAGIC = b"QFI\xfb"
PARTIAL_SUFFIX = ".raksha-partial"  # a restore in progress (or killed): never a finished disk
_STAGED = re.compile(r"\.[0-9a-f]{8}" + re.escape(PARTIAL_SUFFIX) + "$")
SECTOR = 512


def detect_format(path: str) -> str:
    """``raw``, ``qcow2`` or whatever qemu-img recognises; raises for what is not a disk image."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"{path}: no such file", code="IMAGE_NOT_FOUND") from None
    except OSError as exc:
        raise ImageInvalid(f"{path}: cannot access: {exc.strerror}") from None
    if stat.S_ISBLK(st.st_mode):
        return "raw"
    if not stat.S_ISREG(st.st_mode):
        raise ImageInvalid(f"{path}: not a disk image (not a regular file or block device)")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ImageInvalid(f"{path}: cannot read: {exc.strerror}") from None
    if magic == QCOW2_MAGIC:
        return "qcow2"
    fmt = _qemu_img_format(path)
    if fmt not in (None, "raw"):
        return fmt
    if st.st_size == 0 or st.st_size % SECTOR:
        raise ImageInvalid(
            f"{path}: not a disk image (size {st.st_size} is not a positive multiple of {SECTOR} bytes)"
        )
    return "raw"


def _qemu_img_format(path: str) -> str | None:
    try:
        res = subprocess.run(["qemu-img", "info", "--output=json", path], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    return str(json.loads(res.stdout).get("format"))


def open_source(path: str, fmt: str = "auto") -> DiskSource:
    detected = detect_format(path)
    if fmt not in ("auto", detected):
        raise ImageInvalid(f"{path}: is {detected}, not {fmt}")
    if detected == "raw":
        return RawSource(path)
    export = QemuNbdExport(path, detected)
    return NbdSource(export.socket, path=path, fmt=detected, export=export)


def create_target(path: str, fmt: str, size: int, *, overwrite: bool = False) -> DiskTarget:
    """A target for a restore to ``path``.

    A new image is written under a temporary name next to ``path`` and renamed to ``path`` by
    ``commit``, so ``path`` never holds a half-restored disk, even when the restore is killed,
    and an existing file replaced with ``overwrite`` survives a failed restore. Only a block
    device is written in place.
    """
    if fmt not in ("raw", "qcow2"):
        raise InvalidInput(f"restore format {fmt!r} is not supported (raw or qcow2)", code="INVALID_FORMAT")
    if os.path.exists(path):
        if not overwrite:
            raise AlreadyExists(f"{path} exists; choose a new path or pass --force", code="OUTPUT_EXISTS")
        mode = os.stat(path).st_mode
        if stat.S_ISBLK(mode):
            if fmt != "raw":
                raise InvalidInput("a block device can only be restored to as raw", code="INVALID_FORMAT")
            return _InPlace(RawTarget(path, size, fresh=False))
        if not stat.S_ISREG(mode):
            raise InvalidInput(f"{path} is not a regular file or block device", code="OUTPUT_INVALID")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise NotFound(f"{parent}: no such directory", code="OUTPUT_DIR_NOT_FOUND")
    staged = os.path.join(parent, f"{os.path.basename(path)}.{os.urandom(4).hex()}{PARTIAL_SUFFIX}")
    target = RawTarget(staged, size, fresh=True) if fmt == "raw" else NbdTarget(staged, fmt, size)
    return _Staged(target, path, overwrite=overwrite)



def discard_staged(path: str) -> list[str]:
    """Unlink the half-written images that restores to ``path`` left (killed before their commit);
    returns their names. Only files named as ``create_target`` stages them: never ``path`` itself."""
    parent, base = os.path.split(os.path.abspath(path))
    removed = []
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith(base) and _STAGED.fullmatch(name[len(base):]):
            try:
                os.unlink(os.path.join(parent, name))
            except FileNotFoundError:
                continue
            removed.append(name)
    return removed

class _InPlace:
    """An existing block device overwritten in place: nothing to rename or remove."""

    fresh = False

    def __init__(self, target: RawTarget | NbdTarget) -> None:
        self._target = target
        self.path = target.path
        self.format = target.format

    def pwrite(self, data: bytes, offset: int) -> None:
        self._target.pwrite(data, offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._target.write_zeroes(offset, length)

    def flush(self) -> None:
        self._target.flush()

    def close(self) -> None:
        self._target.close()

    def commit(self) -> None:
        pass

    def discard(self) -> None:
        pass


class _Staged(_InPlace):
    """A fresh image written under a temporary name, renamed to ``path`` once complete."""

    fresh = True

    def __init__(self, target: RawTarget | NbdTarget, path: str, *, overwrite: bool) -> None:
        super().__init__(target)
        self._overwrite = overwrite
        self.path = path

    def commit(self) -> None:
        staged = self._target.path
        try:
            if self._overwrite:
                os.replace(staged, self.path)
            else:
                os.link(staged, self.path)  # fails if someone created path meanwhile: never clobber
                os.unlink(staged)
        except FileExistsError:
            self.discard()
            raise AlreadyExists(f"{self.path} appeared while restoring; the restored disk was discarded",
                                code="OUTPUT_EXISTS") from None
        except BaseException:
            self.discard()
            raise
        fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)  # the new name is durable, as the data already is
        finally:
            os.close(fd)

    def discard(self) -> None:
        try:
            os.unlink(self._target.path)
        except FileNotFoundError:
            pass

