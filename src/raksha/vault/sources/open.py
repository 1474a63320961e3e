"""Open what the user named as a source or a target, with clear errors for everything else."""

from __future__ import annotations

import json
import os
import stat
import subprocess

from raksha.domain.errors import AlreadyExists, ImageInvalid, InvalidInput, NotFound
from raksha.vault.sources.base import DiskSource, DiskTarget
from raksha.vault.sources.nbd import NbdSource, NbdTarget, QemuNbdExport
from raksha.vault.sources.raw import RawSource, RawTarget

QCOW2_MAGIC = b"QFI\xfb"
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
    if fmt not in ("raw", "qcow2"):
        raise InvalidInput(f"restore format {fmt!r} is not supported (raw or qcow2)", code="INVALID_FORMAT")
    if os.path.exists(path):
        if not overwrite:
            raise AlreadyExists(f"{path} exists; choose a new path or pass --force", code="OUTPUT_EXISTS")
        if stat.S_ISBLK(os.stat(path).st_mode):
            if fmt != "raw":
                raise InvalidInput("a block device can only be restored to as raw", code="INVALID_FORMAT")
            return RawTarget(path, size, fresh=False)
        os.unlink(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise NotFound(f"{parent}: no such directory", code="OUTPUT_DIR_NOT_FOUND")
    if fmt == "raw":
        return RawTarget(path, size, fresh=True)
    return NbdTarget(path, fmt, size)
