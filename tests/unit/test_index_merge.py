"""A backup indexes each pack as it is stored, then merges those small index objects into few.

Every load of the index reads every object: a vault of a million chunks loaded in 4.3-7 s from the
31,250 objects of one per pack, 1.2 s from ten.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import blake3_file
from raksha.domain.errors import BackendError, StorageFull
from raksha.vault.backends.local import LocalBackend
from raksha.vault.engine import packer as packer_module
from raksha.vault.engine.backup import backup_disk
from raksha.vault.engine.restore import restore_backup
from raksha.vault.format.config import VaultConfig
from raksha.vault.format.index import decode_index
from raksha.vault.format.keys import KdfParams, Secret
from raksha.vault.format.naming import BackupId
from raksha.vault.operations.gc import collect_garbage
from raksha.vault.repository import INDEX_PREFIX, Vault
from raksha.vault.sources.raw import RawSource

K64 = 64 << 10
BID = BackupId.parse("job/run1/vm/vda")


@pytest.fixture
def vault(tmp_path: Path) -> Vault:
    config = VaultConfig.new(chunk_size=K64, pack_size=256 << 10, encrypted=True)  # 3 chunks a pack
    return Vault.init(LocalBackend(tmp_path / "vault", create=True), config, Secret(passphrase=b"pw"),
                      KdfParams(memory_kib=8192))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(40 * K64))  # 40 chunks: 4 a pack
    return path


def back_up(vault: Vault, image: Path) -> int:
    """The packs the backup wrote."""
    source = RawSource(str(image))
    try:
        packs = backup_disk(vault, source, BID).stats.packs_written
    finally:
        source.close()
    assert packs >= 8
    return packs


def index_objects(vault: Vault) -> list[str]:
    return sorted(info.key for info in vault.backend.list(INDEX_PREFIX))


def restores(vault: Vault, image: Path, out: Path) -> bool:
    restore_backup(vault, BID, str(out), overwrite=True)
    return blake3_file(out) == blake3_file(image)


def test_a_backup_of_many_packs_leaves_one_index_object(vault: Vault, image: Path, tmp_path: Path) -> None:
    packs = back_up(vault, image)
    (key,) = index_objects(vault)
    merged = decode_index(vault.backend.get(key), vault.crypto, what=key)
    assert len(merged) == 40 and len(merged.supersedes) == packs  # the packs' own objects, deleted
    assert len(vault.load_index().locations) == 40
    assert restores(vault, image, tmp_path / "out.img")


def test_a_long_backup_merges_as_it_goes(vault: Vault, image: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packer_module, "MERGE_ENTRIES", 10)
    back_up(vault, image)
    sizes = sorted(len(decode_index(vault.backend.get(k), vault.crypto, what=k)) for k in index_objects(vault))
    assert len(sizes) in (3, 4) and sum(sizes) == 40 and all(n >= 10 for n in sizes[1:])
    assert restores(vault, image, tmp_path / "out.img")


def test_small_objects_left_by_a_failed_delete_are_ignored_then_collected(
        vault: Vault, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As after a crash between writing the merged object and deleting the small ones."""
    real_delete = vault.backend.delete

    def delete(key: str) -> bool:
        if key.startswith(INDEX_PREFIX):
            raise BackendError(f"{key}: cannot delete (test)")
        return real_delete(key)

    monkeypatch.setattr(vault.backend, "delete", delete)
    packs = back_up(vault, image)
    assert len(index_objects(vault)) == packs + 1
    index = vault.load_index()
    assert len(index.index_ids) == 1 and len(index.locations) == 40
    monkeypatch.setattr(vault.backend, "delete", real_delete)
    collect_garbage(vault, grace=0)
    assert len(index_objects(vault)) == 1
    assert restores(vault, image, tmp_path / "out.img")


def test_a_merge_that_cannot_be_written_leaves_every_pack_indexed(
        vault: Vault, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = vault.write_index

    def write_index(entries: object, supersedes: list[bytes] | None = None) -> str:
        if supersedes:
            raise StorageFull("no space left for the merged index (test)")
        return real_write(entries, supersedes)  # type: ignore[arg-type]

    monkeypatch.setattr(vault, "write_index", write_index)
    packs = back_up(vault, image)
    assert len(index_objects(vault)) == packs
    assert len(vault.load_index().locations) == 40
    assert restores(vault, image, tmp_path / "out.img")
