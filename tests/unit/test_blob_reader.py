"""BlobReader keeps the pieces of packs it read ahead, per thread: small blobs read one after another
from a few packs cost one device read per piece, not one per blob."""

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


def packs(backend: CountingBackend, n: int) -> dict[str, bytes]:
    out = {}
    for k in range(n):
        key, data = f"data/0{k}/0{k}" + "0" * 60, os.urandom(512 * KIB)
        backend.put(key, data)
        out[key] = data
    return out


def test_blobs_from_several_packs_in_turn_are_read_once_per_piece(tmp_path: Path) -> None:
    backend = CountingBackend(tmp_path / "v")
    vault = Vault.init(backend, VaultConfig.new())
    data = packs(backend, 3)
    reader = BlobReader(vault, read_ahead=256 * KIB, spans=3)
    for offset in range(0, 200 * KIB, 20 * KIB):  # a base and two layers a chunk, chunk after chunk
        for key, content in data.items():
            assert bytes(reader.read_range(key, offset, 10 * KIB)) == content[offset : offset + 10 * KIB]
    assert len(backend.reads) == 3  # one piece of each pack


def test_one_piece_per_thread_is_read_again_whenever_the_pack_changes(tmp_path: Path) -> None:
    backend = CountingBackend(tmp_path / "v")
    vault = Vault.init(backend, VaultConfig.new())
    data = packs(backend, 3)
    reader = BlobReader(vault, read_ahead=256 * KIB)
    for offset in (0, 20 * KIB):
        for key, content in data.items():
            assert bytes(reader.read_range(key, offset, 10 * KIB)) == content[offset : offset + 10 * KIB]
    assert len(backend.reads) == 6


def test_the_least_recently_used_piece_makes_room_and_long_reads_are_not_kept(tmp_path: Path) -> None:
    backend = CountingBackend(tmp_path / "v")
    vault = Vault.init(backend, VaultConfig.new())
    (a, da), (b, db), (c, dc) = packs(backend, 3).items()
    reader = BlobReader(vault, read_ahead=256 * KIB, spans=2)
    reader.read_range(a, 0, KIB)
    reader.read_range(b, 0, KIB)
    reader.read_range(a, KIB, KIB)  # a is the most recently used now
    assert bytes(reader.read_range(c, 0, 300 * KIB)) == dc[: 300 * KIB]  # longer than a piece: read as asked
    assert bytes(reader.read_range(c, 8 * KIB, KIB)) == dc[8 * KIB : 9 * KIB]  # a piece: b's goes
    assert bytes(reader.read_range(a, 2 * KIB, KIB)) == da[2 * KIB : 3 * KIB]
    assert bytes(reader.read_range(b, 2 * KIB, KIB)) == db[2 * KIB : 3 * KIB]
    assert [(key, offset) for key, offset, _ in backend.reads] == [
        (a, 0), (b, 0), (c, 0), (c, 8 * KIB), (b, 2 * KIB)]
