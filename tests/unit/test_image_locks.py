"""QEMU's image locks seen from outside (vault/sources/image_locks.py): the lock bytes QEMU takes, held here
by another open file description as QEMU holds them, and by qemu-nbd itself."""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
from pathlib import Path

import pytest

from raksha.vault.sources.image_locks import _FLOCK, F_OFD_GETLK, WRITE_HELD, WRITE_UNSHARED, image_in_use

F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


def hold(path: Path, byte: int) -> int:
    """A shared OFD lock on ``byte``, as QEMU takes one per permission it holds or will not share."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.fcntl(fd, F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0))
    return fd


@pytest.mark.parametrize("byte", [WRITE_HELD, WRITE_UNSHARED])
def test_an_image_whose_write_lock_is_held_or_unshared_is_in_use(tmp_path: Path, byte: int) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 4096)
    assert F_OFD_GETLK == 36 and not image_in_use(str(image))
    fd = hold(image, byte)
    try:
        assert image_in_use(str(image))
    finally:
        os.close(fd)  # the lock goes with its open file description
    assert not image_in_use(str(image))


def test_a_reader_that_shares_writing_does_not_count(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 4096)
    fd = hold(image, 100)  # "consistent read" held, writes shared: qemu-img info, a backup reading with -U
    try:
        assert not image_in_use(str(image))
    finally:
        os.close(fd)
    assert not image_in_use(str(tmp_path / "missing.img"))


@pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd is installed by scripts/setup.sh")
@pytest.mark.parametrize("writable", [True, False])
def test_qemu_nbd_writing_an_image_makes_it_in_use(tmp_path: Path, writable: bool) -> None:
    """A writable export holds "write" (as a running VM's disk does); a read-only one shares writing."""
    from raksha.vault.sources.nbd import QemuNbdExport

    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    export = QemuNbdExport(str(image), "raw", writable=writable)
    try:
        assert image_in_use(str(image)) is writable
    finally:
        export.close()
    assert not image_in_use(str(image))
