"""A disk brought back to a backup point in place by writing only what differs (hypervisor/rollback.py's core).

Real qcow2 images, a real persistent dirty bitmap in them (qemu-img bitmap), real qemu-io writes and
a real writable qemu-nbd, with no VM: the disk as a shut-off domain leaves it.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from conftest import K64
from raksha.vault.backends.local import LocalBackend
from raksha.vault.engine.backup import backup_disk
from raksha.vault.engine.changes import chunks_to_roll_back, manifests_differ
from raksha.vault.engine.restore import restore_backup, restore_chunks
from raksha.vault.format.config import VaultConfig
from raksha.vault.format.naming import BackupId
from raksha.vault.repository import Vault
from raksha.vault.sources.nbd import NbdInPlace
from raksha.vault.sources.open import open_source
from raksha.vault.sources.raw import RawTarget

CHUNKS = 64  # 4 MiB disk of 64 KiB chunks


def qemu_io(image: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    out = subprocess.run([*args, str(image)], capture_output=True, text=True, check=True)
    assert "error" not in out.stdout.lower() + out.stderr.lower(), out  # qemu-io exits 0 on a failed write


def back_up(vault: Vault, image: Path, run: str) -> BackupId:
    bid = BackupId("job", run, "vm", "vda")
    source = open_source(str(image))
    try:
        backup_disk(vault, source, bid)
    finally:
        source.close()
    return bid


def identical(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)]).returncode == 0


def bitmap_chunks(image: Path, bitmap: str) -> set[int]:
    target = NbdInPlace(str(image), "qcow2", bitmap=bitmap)
    try:
        return {i for off, n in target.dirty_extents() for i in range(off // K64, (off + n - 1) // K64 + 1)}
    finally:
        target.close()


@pytest.fixture
def vault(tmp_path: Path) -> Vault:
    return Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=K64))


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A qcow2 disk: random data in most chunks, a hole in some."""
    path = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(CHUNKS * K64)], check=True)
    rng = random.Random(7)
    qemu_io(path, *(f"write -P {rng.randrange(1, 255)} {i * K64} {K64}" for i in range(CHUNKS) if i % 5))
    return path


def test_writing_the_changed_chunks_brings_the_disk_back_and_the_bitmap_records_them(
        vault: Vault, disk: Path, tmp_path: Path) -> None:
    point = back_up(vault, disk, "r1")  # the point to go back to
    qemu_io(disk, f"write -P 201 {3 * K64} {K64}", f"write -P 202 {10 * K64 + 4096} 4096", f"write -z {21 * K64} {K64}")
    since = back_up(vault, disk, "r2")  # the backup the checkpoint was taken with
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", "4096", str(disk), "cp"], check=True)
    qemu_io(disk, f"write -P 203 {30 * K64 + 512} 1024", f"write -P 204 {40 * K64} {2 * K64}")  # since r2

    m_point, m_since = vault.read_manifest(point), vault.read_manifest(since)
    assert sorted(manifests_differ(m_point, m_since)) == [3, 10, 21]
    target = NbdInPlace(str(disk), "qcow2", bitmap="cp")
    try:
        chunks, parts = chunks_to_roll_back(m_point, m_since, target.dirty_extents())
        assert chunks == [3, 10, 21, 30, 40, 41]
        # Of the chunks the two backups agree on, only the 4 KiB blocks written since r2.
        assert parts == {30: [(0, 4096)], 40: [(0, K64)], 41: [(0, K64)]}
        result = restore_chunks(vault, point, target, chunks, parts=parts)
    finally:
        target.close()

    # Chunks 10, 30 and 40 were holes at r1: written as zeroes, nothing to read from the vault.
    blobs = {m_point.chunk_ids[i] for i in (3, 21, 41)}
    assert result.bytes_written == 5 * K64 + 4096 and result.chunks_verified == result.blobs == len(blobs)
    whole = tmp_path / "r1.raw"
    restore_backup(vault, point, str(whole))
    assert identical(disk, whole)
    # QEMU recorded the restore's writes: the checkpoint still says what changed since r2.
    assert bitmap_chunks(disk, "cp") == {3, 10, 21, 30, 40, 41}
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(disk)], capture_output=True,
                                     text=True, check=True).stdout)
    assert [b["flags"] for b in info["format-specific"]["data"]["bitmaps"]] == [["auto"]]  # saved, consistent


def test_without_the_bitmap_the_writes_since_the_checkpoint_would_stay(vault: Vault, disk: Path,
                                                                        tmp_path: Path) -> None:
    """Why the bitmap is read: the manifests alone miss what the guest wrote after the last backup."""
    point = back_up(vault, disk, "r1")
    since = back_up(vault, disk, "r2")
    qemu_io(disk, f"write -P 205 {7 * K64} 4096")
    assert chunks_to_roll_back(vault.read_manifest(point), vault.read_manifest(since), []) == ([], {})
    whole = tmp_path / "r1.raw"
    restore_backup(vault, point, str(whole))
    assert not identical(disk, whole)


def test_a_raw_file_in_place_gets_zeroes_written_for_a_chunk_that_is_a_hole_at_the_point(
        vault: Vault, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(K64) + random.Random(1).randbytes(K64))
    point = back_up(vault, image, "r1")
    image.write_bytes(random.Random(2).randbytes(2 * K64))  # chunk 0 now holds data where r1 had a hole
    target = RawTarget(str(image), 2 * K64, fresh=False)
    try:
        result = restore_chunks(vault, point, target, [0, 1])
    finally:
        target.close()
    assert image.read_bytes() == bytes(K64) + random.Random(1).randbytes(K64)
    assert result.chunks_verified == result.blobs == 1


def test_disks_of_other_sizes_are_refused(vault: Vault, tmp_path: Path) -> None:
    small, large = tmp_path / "small.raw", tmp_path / "large.raw"
    small.write_bytes(b"\1" * K64)
    large.write_bytes(b"\1" * 2 * K64)
    a, b = back_up(vault, small, "r1"), back_up(vault, large, "r2")
    with pytest.raises(ValueError):
        chunks_to_roll_back(vault.read_manifest(a), vault.read_manifest(b), [])


def test_a_rollback_that_fails_part_way_is_finished_by_the_next_one(vault: Vault, disk: Path,
                                                                     tmp_path: Path) -> None:
    """A blob found damaged while writing stops the restore with some chunks written; the bitmap recorded
    them, so a rollback run again (here to the checkpoint's own point) still brings the disk to its point."""
    from raksha.domain.errors import VaultCorrupt
    from raksha.vault.format.pack import pack_key

    point = back_up(vault, disk, "r1")
    qemu_io(disk, *(f"write -P {60 + i} {i * K64} {K64}" for i in range(1, 40, 3)))  # many chunks differ
    since = back_up(vault, disk, "r2")
    subprocess.run(["qemu-img", "bitmap", "--add", str(disk), "cp"], check=True)
    m_point, m_since = vault.read_manifest(point), vault.read_manifest(since)
    chunks, _ = chunks_to_roll_back(m_point, m_since, [])
    assert len(chunks) == 13
    # Damage the blob of the last chunk to write that r2 does not share (the disk's chunks are one byte
    # repeated: some are alike): found only when it is read, after others were written.
    at_since = set(m_since.chunk_ids)
    damaged = next(m_point.chunk_ids[i] for i in reversed(chunks) if m_point.chunk_ids[i] not in at_since)
    loc = vault.load_index().locations[damaged]
    pack = tmp_path / "vault" / pack_key(loc.pack_id.hex())
    data = bytearray(pack.read_bytes())
    data[loc.offset + loc.stored_length // 2] ^= 0xFF
    pack.write_bytes(bytes(data))

    target = NbdInPlace(str(disk), "qcow2", bitmap="cp")
    try:
        with pytest.raises(VaultCorrupt):
            restore_chunks(vault, point, target, chunks, threads=1)
    finally:
        target.close()
    assert bitmap_chunks(disk, "cp")  # what was written before the failure is marked

    target = NbdInPlace(str(disk), "qcow2", bitmap="cp")
    try:
        chunks, parts = chunks_to_roll_back(m_since, m_since, target.dirty_extents())
        assert chunks and parts.keys() == set(chunks)  # r2 onto r2: only what the bitmap marks
        restore_chunks(vault, since, target, chunks, parts=parts)
    finally:
        target.close()
    whole = tmp_path / "r2.raw"
    restore_backup(vault, since, str(whole))
    assert identical(disk, whole)


def test_dirty_extents_become_ranges_inside_the_chunks_the_backups_agree_on(vault: Vault, disk: Path) -> None:
    point = back_up(vault, disk, "r1")
    qemu_io(disk, f"write -P 201 {3 * K64} {K64}")
    since = back_up(vault, disk, "r2")
    dirty = [(K64 - 4096, 8192), (3 * K64 + 10, 10), (5 * K64, 100), (5 * K64 + 100, 50), (CHUNKS * K64 - 1, 9)]
    chunks, parts = chunks_to_roll_back(vault.read_manifest(point), vault.read_manifest(since), dirty)
    assert chunks == [0, 1, 3, 5, CHUNKS - 1]
    # Across a chunk boundary, touching extents merged, clipped to the disk; chunk 3 differs: written whole.
    assert parts == {0: [(K64 - 4096, K64)], 1: [(0, 4096)], 5: [(0, 150)], CHUNKS - 1: [(K64 - 1, K64)]}
