"""BlobReader: what it asks the backend for. A restore reads small blobs ahead (the next ones lie beside
them in the pack); a backup's rebuilds and merges read each blob as it is (its next blob is in another
pack)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from raksha.vault.backends.local import LocalBackend
from raksha.vault.engine.blobio import BlobReader
from raksha.vault.format.config import VaultConfig
from raksha.vault.repository import Vault

KIB = 1024


class CountingBackend(LocalBackend):
    def __init__(self, root: Path) -> None:
        super().__init__(root, create=True)
        self.reads: list[tuple[str, int, int]] = []

    def get_range_into(self, key: str, offset: int, length: int, buf: mmap.mmap) -> memoryview:
        self.reads.append((key, offset, length))
        return super().get_range_into(key, offset, length, buf)


def two_packs(tmp_path: Path) -> tuple[CountingBackend, Vault, dict[str, bytes]]:
    backend = CountingBackend(tmp_path / "v")
    vault = Vault.init(backend, VaultConfig.new())
    packs = {f"data/0{k}/0{k}" + "0" * 60: os.urandom(512 * KIB) for k in range(2)}
    for key, data in packs.items():
        backend.put(key, data)
    return backend, vault, packs


def test_small_blobs_are_read_ahead_and_served_from_the_piece_while_the_pack_stays_the_same(tmp_path: Path) -> None:
    backend, vault, packs = two_packs(tmp_path)
    (a, da), (b, db) = packs.items()
    reader = BlobReader(vault, read_ahead=256 * KIB)
    for offset in range(0, 200 * KIB, 20 * KIB):
        assert bytes(reader.read_range(a, offset, 10 * KIB)) == da[offset : offset + 10 * KIB]
    assert bytes(reader.read_range(b, 0, 10 * KIB)) == db[: 10 * KIB]
    assert bytes(reader.read_range(a, 0, 10 * KIB)) == da[: 10 * KIB]  # the piece of a was replaced by b's
    assert bytes(reader.read_range(a, 300 * KIB, 256 * KIB)) == da[300 * KIB : 556 * KIB]  # not small: as asked
    assert backend.reads == [(a, 0, 256 * KIB), (b, 0, 256 * KIB), (a, 0, 256 * KIB), (a, 300 * KIB, 256 * KIB)]


def test_without_read_ahead_each_blob_is_read_as_it_is(tmp_path: Path) -> None:
    backend, vault, packs = two_packs(tmp_path)
    (a, da), _ = packs.items()
    reader = BlobReader(vault)
    for offset in (0, 20 * KIB):
        assert bytes(reader.read_range(a, offset, 10 * KIB)) == da[offset : offset + 10 * KIB]
    assert backend.reads == [(a, 0, 10 * KIB), (a, 20 * KIB, 10 * KIB)]
