"""Open what the user named as a source or a target, with clear errors for everything else."""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import subprocess
from collections.abc import Sequence

from raksha.domain.errors import AlreadyExists, ImageInUse, ImageInvalid, InvalidInput, NotFound
from raksha.vault.sources.base import DiskSource, DiskTarget
from raksha.vault.sources.image_locks import image_in_use
from raksha.vault.sources.nbd import NbdSource, NbdTarget, QemuNbdExport
from raksha.vault.sources.qcow2 import CLUSTER, Qcow2Layout, Qcow2Target
from raksha.vault.sources.raw import RawSource, RawTarget

QCOW2_MAGIC = b"QFI\xfb"
QCOW2_HEADER = 104  # a version-3 header's fixed part
QCOW2_EXTERNAL_DATA = 1 << 2  # incompatible feature: the guest data lives in another file
PARTIAL_SUFFIX = ".raksha-partial"  # a restore in progress (or killed): never a finished disk
_STAGED = re.compile(r"\.[0-9a-f]{8}" + re.escape(PARTIAL_SUFFIX) + "$")
SECTOR = 512


def _stat_image(path: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"{path}: no such file", code="IMAGE_NOT_FOUND") from None
    except OSError as exc:
        raise ImageInvalid(f"{path}: cannot access: {exc.strerror}") from None
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise ImageInvalid(f"{path}: not a disk image (not a regular file or block device)")
    return st


def _check_raw_size(path: str, st: os.stat_result) -> None:
    if stat.S_ISREG(st.st_mode) and (st.st_size == 0 or st.st_size % SECTOR):
        raise ImageInvalid(
            f"{path}: not a disk image (size {st.st_size} is not a positive multiple of {SECTOR} bytes)"
        )


def _head(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(QCOW2_HEADER)
    except OSError as exc:
        raise ImageInvalid(f"{path}: cannot read: {exc.strerror}") from None


def _qcow2_external(head: bytes) -> str | None:
    """What other file a qcow2 header makes a reader open: its backing file, or its external data file
    (version 3's incompatible feature bit 2); None if neither."""
    version, backing_offset = struct.unpack_from(">IQ", head, 4) if len(head) >= 16 else (0, 0)
    if backing_offset:
        return "a backing file"
    if version >= 3 and len(head) >= 80 and struct.unpack_from(">Q", head, 72)[0] & QCOW2_EXTERNAL_DATA:
        return "an external data file"
    return None


def detect_format(path: str) -> str:
    """``raw``, ``qcow2`` or whatever qemu-img recognises; raises for what is not a disk image.

    A guessed format must not make Raksha read other files: a raw disk's guest can write a qcow2 header
    naming a backing file such as a host's private key, which the backup would then hold. An image
    guessed to have a backing file or an external data file is refused (``FORMAT_UNCONFIRMED``) until
    the caller says its format (``open_source(path, fmt)``), as libvirt never probes formats."""
    st = _stat_image(path)
    if stat.S_ISBLK(st.st_mode):
        return "raw"
    head = _head(path)
    fmt: str | None
    if head[:4] == QCOW2_MAGIC:
        fmt, external = "qcow2", _qcow2_external(head)
    else:
        fmt, external = _qemu_img_probe(path)
    if fmt not in (None, "raw"):
        if external is not None:
            raise ImageInvalid(
                f"{path}: looks like {fmt} with {external}; a format that is only guessed may not make Raksha "
                f"read other files (a raw disk's guest can write such a header): pass --format {fmt} if it "
                "is one, --format raw if it is a raw disk", code="FORMAT_UNCONFIRMED")
        return fmt
    _check_raw_size(path, st)
    return "raw"


def _qemu_img_probe(path: str) -> tuple[str | None, str | None]:
    """qemu-img's guess at the format, and what other file it would read (None if none)."""
    try:
        res = subprocess.run(["qemu-img", "info", "--output=json", path], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    if res.returncode != 0:
        return None, None
    info = json.loads(res.stdout)
    data = (info.get("format-specific") or {}).get("data") or {}
    if info.get("backing-filename"):
        return str(info.get("format")), "a backing file"
    if data.get("data-file"):
        return str(info.get("format")), "an external data file"
    if any(os.path.realpath(e.get("filename", path)) != os.path.realpath(path) for e in data.get("extents", [])):
        return str(info.get("format")), "extents in other files"
    return str(info.get("format")), None


def open_source(path: str, fmt: str = "auto") -> DiskSource:
    """The disk image at ``path``: of the format the caller says (trusted, no guessing: a raw disk is
    read as raw whatever its guest wrote at its start), or of the one ``detect_format`` guesses.

    Not while QEMU has it open for writing (``IMAGE_IN_USE``), as ``qemu-img`` refuses without ``-U``: what a
    running VM writes during the read would make a backup of no point in time (the driver freezes the VM
    and reads a point-in-time export instead)."""
    refuse_if_in_use(path, reading=True)
    if fmt == "raw":
        st = _stat_image(path)
        _check_raw_size(path, st)
        return RawSource(path)
    if fmt == "qcow2":
        if stat.S_ISREG(_stat_image(path).st_mode) and _head(path)[:4] != QCOW2_MAGIC:
            raise ImageInvalid(f"{path}: is not qcow2 (no qcow2 header)")
        detected = fmt
    else:
        detected = detect_format(path) if fmt == "auto" else _qemu_img_probe(path)[0] or "raw"
        if fmt not in ("auto", detected):
            raise ImageInvalid(f"{path}: is {detected}, not {fmt}")
    if detected == "raw":
        return RawSource(path)
    export = QemuNbdExport(path, detected)
    return NbdSource(export.socket, path=path, fmt=detected, export=export)


def refuse_if_in_use(path: str, *, reading: bool = False) -> None:
    """Raise ``IMAGE_IN_USE`` if QEMU has ``path`` open for writing (image_locks.py): never written over under
    a VM, nor read as if it held one point in time."""
    if image_in_use(path):
        why = ("reading it now would mix what the VM writes meanwhile into it; back the VM up through the "
               "driver (raksha serve), which freezes it and reads a point in time, or " if reading else "")
        raise ImageInUse(f"{path} is open in QEMU (a running VM or an export holds its write lock): "
                         f"{why}shut the VM off or end the export first", path=path)


def create_target(path: str, fmt: str, size: int, *, overwrite: bool = False,
                  data_chunks: tuple[int, Sequence[int]] | None = None) -> DiskTarget:
    """A target for a restore to ``path``.

    ``data_chunks`` (chunk size, the sorted indexes of the chunks with data), when the caller knows
    them, lets a new qcow2 image be written directly (``Qcow2Target``) instead of through qemu-nbd;
    only those chunks may then be written.

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
        refuse_if_in_use(path)
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
    target: RawTarget | NbdTarget | Qcow2Target
    if fmt == "raw":
        target = RawTarget(staged, size, fresh=True)
    elif data_chunks is not None and size % 512 == 0 and data_chunks[0] % CLUSTER == 0:
        target = Qcow2Target(staged, Qcow2Layout.plan(size, data_chunks[0], data_chunks[1]))
    else:  # qcow2 sizes are whole 512-byte sectors: qemu-img rounds such a size up
        target = NbdTarget(staged, fmt, size)
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

    def __init__(self, target: RawTarget | NbdTarget | Qcow2Target) -> None:
        self._target = target
        self.path = target.path
        self.format = target.format
        self.takes_views = target.takes_views

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

    def __init__(self, target: RawTarget | NbdTarget | Qcow2Target, path: str, *, overwrite: bool) -> None:
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

