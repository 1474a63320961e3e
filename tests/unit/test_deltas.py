"""Deltas (format.md §8.1): a chunk changed in part is stored as a layer of just the changed bytes on
its parent's chunk, so an incremental's work follows what changed, not the chunk size.

Each test writes known bytes into real image files, backs them up incrementally with the exact
changed extents, and restores every point bit-exact.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import MIB, blake3_file
from raksha.domain.errors import VaultCorrupt
from raksha.vault.backends.local import LocalBackend
from raksha.vault.backends.memory import MemoryBackend
from raksha.vault.engine import backup as backup_module
from raksha.vault.engine import layering
from raksha.vault.engine.backup import BackupResult, backup_disk
from raksha.vault.engine.blobio import BlobReader
from raksha.vault.engine.layering import MAX_LAYERS, MAX_RANGES, Choice, choose
from raksha.vault.engine.progress import ProgressCallback, ProgressEvent
from raksha.vault.engine.restore import restore_backup, touched_blocks
from raksha.vault.format.config import VaultConfig
from raksha.vault.format.constants import ZERO_ID
from raksha.vault.format.crypto import Crypto, EncryptedCrypto, MasterKey
from raksha.vault.format.deltas import (
    Deltas,
    Layer,
    MergedDeltas,
    NewEntries,
    covered_ranges,
    encode_layers,
    live_layers,
)
from raksha.vault.format.keys import KdfParams, Secret
from raksha.vault.format.manifest import Manifest, decode_manifest, encode_manifest
from raksha.vault.format.naming import BackupId
from raksha.vault.format.pack import pack_key
from raksha.vault.format.scratch import SpillingBuffer
from raksha.vault.operations.gc import collect_garbage
from raksha.vault.operations.verify import verify_vault
from raksha.vault.repository import Vault
from raksha.vault.sources.open import open_source

KIB = 1024


@pytest.fixture(params=["memory-plain", "local-encrypted"])
def vault(request: pytest.FixtureRequest, tmp_path: Path) -> Vault:
    encrypted = request.param.endswith("encrypted")
    backend = MemoryBackend() if request.param.startswith("memory") else LocalBackend(tmp_path / "v", create=True)
    return Vault.init(backend, VaultConfig.new(encrypted=encrypted),
                      Secret(passphrase=b"x") if encrypted else None, KdfParams(memory_kib=8192))


class Disk:
    """A 4 MiB raw image of random bytes; ``write`` changes it and remembers the extents since the last backup."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_bytes(os.urandom(4 * MIB))
        self.changed: list[tuple[int, int]] = []
        self.runs = 0

    def write(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)
        self.changed.append((offset, len(data)))

    def backup(self, vault: Vault, *, full: bool = False, progress: ProgressCallback | None = None) -> BackupResult:
        self.runs += 1
        source = open_source(str(self.path))
        try:
            result = backup_disk(
                vault, source, BackupId.parse(f"job/run{self.runs}/vm/vda"),
                parent=None if full else BackupId.parse(f"job/run{self.runs - 1}/vm/vda"),
                changed_extents=None if full else self.changed, progress=progress)
        finally:
            source.close()
        shutil.copyfile(self.path, self.path.with_suffix(f".run{self.runs}"))  # what this point holds
        self.changed = []
        return result

    def restores_exactly(self, vault: Vault, run: int, out: Path) -> bool:
        restore_backup(vault, BackupId.parse(f"job/run{run}/vm/vda"), str(out), overwrite=True)
        return blake3_file(out) == blake3_file(self.path.with_suffix(f".run{run}"))


def manifest(vault: Vault, run: int) -> Manifest:
    return vault.read_manifest(BackupId.parse(f"job/run{run}/vm/vda"))


@pytest.fixture(params=["source", "vault"])
def merge_reads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Where a merge reads the ranges of the parent's layers: from the source within its budget (a tenth
    of the change and a chunk), or, past it, from the vault (here: no budget at all)."""
    if request.param == "vault":
        monkeypatch.setattr(backup_module, "merge_source_budget", lambda changed, chunk: 0)
    return str(request.param)


def test_layers_accumulate_up_to_the_limit_then_merge_into_one(vault: Vault, tmp_path: Path,
                                                              merge_reads: str) -> None:
    disk = Disk(tmp_path / "disk.img")
    full = disk.backup(vault, full=True)
    assert manifest(vault, 1).version == 1 and full.stats.chunks_delta == 0  # a full never writes deltas

    for n in range(1, MAX_LAYERS + 2):
        disk.write(MIB + n * 64 * KIB, os.urandom(8 * KIB))  # chunk 1, a new place each time
        inc = disk.backup(vault)
        layers = manifest(vault, n + 1).deltas.get(1, [])
        assert manifest(vault, n + 1).chunk_ids[1] == manifest(vault, 1).chunk_ids[1]  # the base stays
        merging = n > MAX_LAYERS and merge_reads == "source"  # then every range the merge covers is read
        assert (inc.stats.chunks_patched, inc.stats.bytes_read) == (0, (n if merging else 1) * 8 * KIB)
        if n <= MAX_LAYERS:
            assert (inc.stats.chunks_delta, inc.stats.chunks_merged, len(layers)) == (1, 0, n)
            assert inc.stats.bytes_stored < 9 * KIB
        else:  # one layer too many: the parent's layers and the change become one layer of all their ranges
            assert (inc.stats.chunks_delta, inc.stats.chunks_merged, len(layers)) == (1, 1, 1)
            assert layers[0].ranges == tuple((k * 64 * KIB, 8 * KIB) for k in range(1, n + 1))
            assert n * 8 * KIB < inc.stats.bytes_stored < n * 9 * KIB
    disk.write(MIB + 7 * KIB, os.urandom(KIB))
    inc = disk.backup(vault)  # and layering starts again on the merged layer
    assert (inc.stats.chunks_delta, inc.stats.chunks_merged, len(manifest(vault, disk.runs).deltas[1])) == (1, 0, 2)

    for run in range(1, disk.runs + 1):
        assert disk.restores_exactly(vault, run, tmp_path / "out.img"), f"run {run}"
    assert verify_vault(vault).ok


def test_blocks_rewritten_every_run_keep_one_layer_and_read_nothing_of_the_vault(vault: Vault, tmp_path: Path) -> None:
    """A journal or a database's hot pages: the same blocks written before every backup. The new layer
    overwrites the parent's entirely, so it replaces it: one layer, whatever the number of runs."""
    disk = Disk(tmp_path / "disk.img")
    disk.backup(vault, full=True)
    for _ in range(MAX_LAYERS + 2):
        disk.write(2 * MIB + 100 * KIB, os.urandom(40 * KIB))
        disk.write(2 * MIB + 120 * KIB, os.urandom(50 * KIB))  # overlapping the first
        inc = disk.backup(vault)
        assert (inc.stats.chunks_delta, inc.stats.chunks_merged, inc.stats.chunks_patched) == (1, 0, 0)
        assert inc.stats.bytes_read == 70 * KIB and inc.stats.bytes_stored < 71 * KIB
        assert [layer.ranges for layer in manifest(vault, disk.runs).deltas[2]] == [((100 * KIB, 70 * KIB),)]
    disk.write(2 * MIB + 110 * KIB, os.urandom(KIB))  # inside the layer: on top of it
    disk.backup(vault)
    assert len(manifest(vault, disk.runs).deltas[2]) == 2
    assert manifest(vault, disk.runs).chunk_ids[2] == manifest(vault, 1).chunk_ids[2]
    for run in range(1, disk.runs + 1):
        assert disk.restores_exactly(vault, run, tmp_path / "out.img"), f"run {run}"
    assert verify_vault(vault).ok


def test_blocks_rewritten_in_part_merge_their_layers_and_never_rebuild_the_chunk(vault: Vault, tmp_path: Path,
                                                                                 merge_reads: str) -> None:
    """Writes that move a little every run overlap the last layer without covering it: layers stack up to
    the limit, then merge with the change into one, again and again."""
    disk = Disk(tmp_path / "disk.img")
    disk.backup(vault, full=True)
    for k in range(3 * MAX_LAYERS + 1):
        disk.write(2 * MIB + 100 * KIB + k * KIB, os.urandom(40 * KIB))
        inc = disk.backup(vault)
        merging = k > 0 and k % MAX_LAYERS == 0
        read = (40 + k) * KIB if merging and merge_reads == "source" else 40 * KIB
        assert (inc.stats.chunks_delta, inc.stats.chunks_patched, inc.stats.bytes_read) == (1, 0, read)
        layers = manifest(vault, disk.runs).deltas[2]
        assert len(layers) == k % MAX_LAYERS + 1
        assert inc.stats.chunks_merged == (k > 0 and k % MAX_LAYERS == 0)
        if inc.stats.chunks_merged:  # everything written since the full, in one range
            assert layers[0].ranges == ((100 * KIB, (40 + k) * KIB),)
    assert manifest(vault, disk.runs).chunk_ids[2] == manifest(vault, 1).chunk_ids[2]
    for run in range(1, disk.runs + 1):
        assert disk.restores_exactly(vault, run, tmp_path / "out.img"), f"run {run}"
    assert verify_vault(vault).ok


def test_merges_read_from_the_source_within_their_budget_and_from_the_vault_past_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backup_module, "merge_source_budget", lambda changed, chunk: 40 * KIB)
    vault = Vault.init(LocalBackend(tmp_path / "v", create=True), VaultConfig.new())
    disk = Disk(tmp_path / "disk.img")
    disk.backup(vault, full=True)
    for n in range(MAX_LAYERS):  # chunks 1 and 2 at the bound on layers
        for chunk in (1, 2):
            disk.write(chunk * MIB + n * 64 * KIB, os.urandom(8 * KIB))
        disk.backup(vault)
    vault_reads: list[str] = []
    read_range = BlobReader.read_range
    monkeypatch.setattr(BlobReader, "read_range",
                        lambda self, key, off, n: vault_reads.append(key) or read_range(self, key, off, n))
    for chunk in (1, 2):
        disk.write(chunk * MIB + MAX_LAYERS * 64 * KIB, os.urandom(8 * KIB))

    inc = disk.backup(vault)

    # Both merge. Chunk 1's four other ranges (32 KiB) fit the budget: read from the disk, around the
    # change. Chunk 2's do not fit what is left: its four layers are read from the vault.
    assert (inc.stats.chunks_merged, inc.stats.chunks_patched) == (2, 0)
    assert inc.stats.bytes_read == 2 * 8 * KIB + 4 * 8 * KIB
    assert len(vault_reads) == MAX_LAYERS
    assert [len(manifest(vault, disk.runs).deltas[c]) for c in (1, 2)] == [1, 1]
    for run in range(1, disk.runs + 1):
        assert disk.restores_exactly(vault, run, tmp_path / "out.img"), f"run {run}"


def test_layers_that_would_merge_into_more_than_half_a_chunk_rebuild_it(vault: Vault, tmp_path: Path) -> None:
    disk = Disk(tmp_path / "disk.img")
    disk.backup(vault, full=True)
    for n in range(MAX_LAYERS):
        disk.write(MIB + n * 128 * KIB, os.urandom(100 * KIB))
        assert disk.backup(vault).stats.chunks_delta == 1
    disk.write(MIB + 600 * KIB, os.urandom(200 * KIB))  # 600 KiB covered in all: more than half
    inc = disk.backup(vault)
    assert (inc.stats.chunks_delta, inc.stats.chunks_merged, inc.stats.chunks_patched) == (0, 0, 1)
    assert 1 not in manifest(vault, disk.runs).deltas
    assert disk.restores_exactly(vault, disk.runs, tmp_path / "out.img")


def test_a_merge_whose_layers_are_unreadable_reads_the_whole_chunk(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backup_module, "merge_source_budget", lambda changed, chunk: 0)  # merges read the vault
    vault = Vault.init(LocalBackend(tmp_path / "v", create=True), VaultConfig.new())
    disk = Disk(tmp_path / "disk.img")
    disk.backup(vault, full=True)
    for n in range(MAX_LAYERS):
        disk.write(MIB + n * 64 * KIB, os.urandom(8 * KIB))
        disk.backup(vault)
    layer = manifest(vault, disk.runs).deltas[1][-1]
    loc = vault.load_index().locations[layer.blob_id]
    pack = tmp_path / "v" / pack_key(loc.pack_id.hex())
    data = bytearray(pack.read_bytes())
    data[loc.offset + 40] ^= 1  # the layer's blob no longer matches its id: the index still lists it
    pack.write_bytes(bytes(data))
    disk.write(MIB + 5 * 64 * KIB, os.urandom(8 * KIB))
    events: list[ProgressEvent] = []
    inc = disk.backup(vault, progress=events.append)
    assert (inc.stats.chunks_delta, inc.stats.chunks_merged, inc.stats.bytes_read) == (0, 0, MIB)
    assert events[-1].done == events[-1].total == 5 * 8 * KIB  # the merge as planned, though the chunk was read
    assert 1 not in manifest(vault, disk.runs).deltas  # read from the disk and stored whole
    assert disk.restores_exactly(vault, disk.runs, tmp_path / "out.img")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_writes_over_many_runs_restore_exactly_within_the_bounds(tmp_path: Path, seed: int,
                                                                        merge_reads: str) -> None:
    """Layers added, left out, merged and rebuilt in any order: every point restores to what the disk held,
    and no chunk passes the policy's bounds (a restore's reads stay bounded)."""
    rng = random.Random(seed)
    vault = Vault.init(MemoryBackend(), VaultConfig.new())
    disk = Disk(tmp_path / "disk.img")
    disk.backup(vault, full=True)
    hot = [(rng.randrange(4 * MIB - 300 * KIB), rng.randrange(1, 300 * KIB)) for _ in range(6)]
    merged = rebuilt = 0
    for _ in range(14):
        for off, n in [*rng.sample(hot, 3), (rng.randrange(4 * MIB - 600 * KIB), rng.randrange(1, 600 * KIB))]:
            off += rng.choice((0, 0, rng.randrange(-8 * KIB, 8 * KIB)))  # the same blocks, or a little off
            off = min(max(0, off), 4 * MIB - n)
            disk.write(off, os.urandom(n) if rng.random() < 0.8 else bytes(n))
        given = sum(n for _, n in disk.changed)
        stats = disk.backup(vault).stats
        assert stats.bytes_read <= given + given // 10 + MIB  # merges read from the source within their budget
        merged, rebuilt = merged + stats.chunks_merged, rebuilt + stats.chunks_patched
        for i, layers in manifest(vault, disk.runs).deltas.items():
            assert len(layers) <= MAX_LAYERS, (disk.runs, i)
            assert 2 * sum(layer.length for layer in layers) <= MIB, (disk.runs, i)
    assert merged and rebuilt  # every way a chunk changed in part can go, taken
    for run in range(1, disk.runs + 1):
        assert disk.restores_exactly(vault, run, tmp_path / "out.img"), f"run {run}"
    assert verify_vault(vault).ok


def test_the_policy_layers_while_small_then_merges_then_rebuilds() -> None:
    def layer(*ranges: tuple[int, int]) -> Layer:
        return Layer(b"\x01" * 32, ranges)

    chunk = 1 << 20
    assert choose([], [(0, 4096)], chunk, room_left=1) is Choice.LAYER
    assert choose([], [(0, 4096)], chunk, room_left=0) is Choice.REBUILD  # the disk's share of layered chunks is used
    assert choose([], [(k * 8192, 10) for k in range(MAX_RANGES + 1)], chunk, 1) is Choice.REBUILD
    assert choose([], [(0, chunk // 2 + 1)], chunk, 1) is Choice.REBUILD  # more than half at once
    four = [layer((k * 65536, 4096)) for k in range(MAX_LAYERS)]
    assert choose(four[:-1], [(500_000, 4096)], chunk, 1) is Choice.LAYER
    assert choose(four, [(500_000, 4096)], chunk, 1) is Choice.MERGE  # a fifth: merged, 20 KiB in all
    assert choose(four, [(0, 4096)], chunk, 1) is Choice.LAYER  # the first is overwritten: three left, plus this
    big = [layer((k * 200_000, 100_000)) for k in range(MAX_LAYERS)]
    assert choose(big, [(900_000, 130_000)], chunk, 1) is Choice.REBUILD  # merged: more than half


def test_live_layers_leave_out_those_overwritten_entirely() -> None:
    a, b, c = (Layer(bytes([n]) * 32, r) for n, r in ((1, ((0, 10), (20, 10))), (2, ((5, 10),)), (3, ((25, 5),))))
    assert live_layers([a, b, c], [(0, 4)]) == [a, b, c]
    assert live_layers([a, b, c], [(0, 5), (15, 5)]) == [a, b, c]  # 20-25 of a shows
    assert live_layers([a, b, c], [(0, 5), (15, 10)]) == [b, c]  # a: 0-5 and 15-25 by the change, 5-15 by b, 25-30 by c
    assert live_layers([a, b, c], [(0, 30)]) == []
    assert live_layers([a, b, c], [(5, 10)]) == [a, c]  # b exactly rewritten
    assert live_layers([a], [(0, 10), (20, 10)]) == [] and live_layers([a], [(0, 10), (21, 9)]) == [a]


def test_covered_ranges_are_every_byte_the_layers_write_in_order() -> None:
    layers = [Layer(ZERO_ID, ((0, 10), (100, 50))), Layer(ZERO_ID, ((140, 20), (300, 5)))]
    assert covered_ranges(layers) == ((0, 10), (100, 60), (300, 5))
    assert covered_ranges(layers, [(10, 5), (120, 10), (305, 1)]) == ((0, 15), (100, 60), (300, 6))
    assert covered_ranges([], [(8, 2), (0, 4)]) == ((0, 4), (8, 2))


def test_layers_cover_at_most_half_a_chunk(vault: Vault, tmp_path: Path) -> None:
    disk = Disk(tmp_path / "disk.img")
    disk.backup(vault, full=True)
    disk.write(2 * MIB, os.urandom(300 * KIB))
    assert disk.backup(vault).stats.chunks_delta == 1
    disk.write(2 * MIB + 600 * KIB, os.urandom(300 * KIB))  # 600 KiB of layers would be more than half
    inc = disk.backup(vault)
    assert (inc.stats.chunks_delta, inc.stats.chunks_patched) == (0, 1)
    assert 2 not in manifest(vault, 3).deltas
    disk.write(2 * MIB + 100, os.urandom(MIB // 2 + 1))  # more than half changed at once: stored whole
    assert disk.backup(vault).stats.chunks_patched == 1
    for run in (2, 3, 4):
        assert disk.restores_exactly(vault, run, tmp_path / "out.img")


def test_a_layer_of_too_many_ranges_is_not_made(vault: Vault, tmp_path: Path) -> None:
    disk = Disk(tmp_path / "disk.img")
    disk.backup(vault, full=True)
    for k in range(MAX_RANGES + 1):  # scattered small writes in one chunk: one range each
        disk.write(MIB + k * 8 * KIB, os.urandom(KIB))
    inc = disk.backup(vault)
    assert (inc.stats.chunks_delta, inc.stats.chunks_patched) == (0, 1)
    assert disk.restores_exactly(vault, 2, tmp_path / "out.img")


def test_at_most_a_share_of_the_chunks_carry_layers(vault: Vault, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """So a manifest stays bounded by the disk's size: past the share, changed chunks are stored whole."""
    monkeypatch.setattr(layering, "MIN_LAYERED_ROOM", 2)  # 4 chunks: at most 2 layered
    disk = Disk(tmp_path / "disk.img")
    disk.backup(vault, full=True)
    for i in range(3):
        disk.write(i * MIB + 4 * KIB, os.urandom(4 * KIB))
    inc = disk.backup(vault)
    assert (inc.stats.chunks_delta, inc.stats.chunks_patched) == (2, 1)
    disk.write(3 * MIB + 4 * KIB, os.urandom(4 * KIB))  # the layered chunks keep theirs: no room
    assert disk.backup(vault).stats.chunks_patched == 1
    assert len(manifest(vault, 3).deltas) == 2
    for run in (2, 3):
        assert disk.restores_exactly(vault, run, tmp_path / "out.img")


def test_unchanged_chunks_keep_their_layers_and_overlapping_layers_apply_in_order(vault: Vault,
                                                                                  tmp_path: Path) -> None:
    disk = Disk(tmp_path / "disk.img")
    disk.backup(vault, full=True)
    disk.write(MIB + 4 * KIB, os.urandom(16 * KIB))
    disk.write(3 * MIB - 2 * KIB, os.urandom(4 * KIB))  # across the boundary of chunks 2 and 3
    disk.backup(vault)
    disk.write(5, os.urandom(100))  # chunk 0 only
    disk.backup(vault)
    assert manifest(vault, 3).deltas[1] == manifest(vault, 2).deltas[1]
    assert sorted(manifest(vault, 3).deltas) == [0, 1, 2, 3]
    disk.write(MIB + 8 * KIB, os.urandom(4 * KIB))  # inside the first layer's range: the newer bytes win
    disk.backup(vault)
    assert len(manifest(vault, 4).deltas[1]) == 2
    for run in (1, 2, 3, 4):
        assert disk.restores_exactly(vault, run, tmp_path / "out.img")


def test_a_layer_of_zeros_is_not_stored(vault: Vault, tmp_path: Path) -> None:
    disk = Disk(tmp_path / "disk.img")
    disk.backup(vault, full=True)
    disk.write(MIB + 4 * KIB, bytes(64 * KIB))  # e.g. the guest zeroed a block
    inc = disk.backup(vault)
    assert inc.stats.bytes_stored == 0
    assert manifest(vault, 2).deltas[1] == [Layer(ZERO_ID, ((4 * KIB, 64 * KIB),))]
    assert disk.restores_exactly(vault, 2, tmp_path / "out.img")


def test_a_layer_on_a_chunk_of_zeros(vault: Vault, tmp_path: Path) -> None:
    disk = Disk(tmp_path / "disk.img")
    disk.write(0, bytes(MIB))
    disk.backup(vault, full=True)
    assert manifest(vault, 1).chunk_ids[0] == ZERO_ID
    disk.write(12 * KIB, os.urandom(4 * KIB))
    disk.backup(vault)
    m = manifest(vault, 2)
    assert m.chunk_ids[0] == ZERO_ID and not m.is_zero(0) and len(m.deltas[0]) == 1
    assert disk.restores_exactly(vault, 2, tmp_path / "out.img")


def test_layers_on_holes_restore_exactly_and_stay_sparse(vault: Vault, tmp_path: Path) -> None:
    """Written from its layers' blocks alone (no fill or scan of the chunk): the rest stays a hole."""
    disk = Disk(tmp_path / "disk.img")
    with open(disk.path, "r+b") as f:
        f.truncate(0)
        f.truncate(4 * MIB)
    disk.backup(vault, full=True)  # chunks 0-3: holes
    disk.write(12 * KIB + 5, os.urandom(100))  # one block, unaligned
    disk.write(MIB + 8 * KIB, bytes(4 * KIB))  # zeros written over a hole: a zero layer
    disk.write(2 * MIB + 60 * KIB, os.urandom(10 * KIB))  # three blocks
    disk.write(2 * MIB + 62 * KIB, os.urandom(KIB))  # inside them again, next backup: a second layer
    disk.backup(vault)
    disk.write(2 * MIB + 900 * KIB, os.urandom(KIB))
    disk.backup(vault)
    m = manifest(vault, 3)
    assert m.chunk_ids[2] == ZERO_ID and len(m.deltas[2]) == 2 and m.deltas[1][0].blob_id == ZERO_ID
    out = tmp_path / "out.img"
    assert disk.restores_exactly(vault, 3, out)
    assert os.stat(out).st_blocks * 512 <= 6 * 4 * KIB  # blocks the layers wrote: 1 + 1 + 3 + 1


def test_the_blocks_layers_touch() -> None:
    layers = [Layer(ZERO_ID, ((5, 10), (8190, 4))), Layer(ZERO_ID, ((4096, 1),)), Layer(ZERO_ID, ((20000, 3000),))]
    assert touched_blocks(layers, 64 * KIB) == [(0, 12288), (16384, 24576)]
    assert touched_blocks(layers, 22000) == [(0, 12288), (16384, 22000)]  # a short last chunk


def test_deleting_parents_and_collecting_garbage_keeps_every_layer_a_backup_needs(vault: Vault,
                                                                                   tmp_path: Path) -> None:
    disk = Disk(tmp_path / "disk.img")
    disk.backup(vault, full=True)
    disk.write(MIB + 4 * KIB, os.urandom(8 * KIB))
    disk.backup(vault)
    disk.write(2 * MIB + 4 * KIB, os.urandom(8 * KIB))
    disk.backup(vault)
    for run in (1, 2):
        vault.delete_backup(BackupId.parse(f"job/run{run}/vm/vda"))
    collect_garbage(vault, grace=0, max_wait=5, poll=0.05)
    assert disk.restores_exactly(vault, 3, tmp_path / "out.img")
    assert verify_vault(vault).ok


def test_verify_names_every_backup_that_needs_a_damaged_layer(tmp_path: Path) -> None:
    vault = Vault.init(LocalBackend(tmp_path / "v", create=True), VaultConfig.new())
    disk = Disk(tmp_path / "disk.img")
    disk.backup(vault, full=True)
    disk.write(MIB + 4 * KIB, os.urandom(8 * KIB))
    disk.backup(vault)
    disk.write(3 * MIB, os.urandom(8 * KIB))
    disk.backup(vault)  # inherits chunk 1's layer
    layer = manifest(vault, 2).deltas[1][0].blob_id
    loc = vault.load_index().locations[layer]
    pack = tmp_path / "v" / pack_key(loc.pack_id.hex())
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + loc.stored_length // 2] ^= 0xFF
    pack.write_bytes(bytes(raw))

    report = verify_vault(vault)
    assert sorted(report.damaged_backups) == ["job/run2/vm/vda", "job/run3/vm/vda"]
    with pytest.raises(VaultCorrupt):
        restore_backup(vault, BackupId.parse("job/run2/vm/vda"), str(tmp_path / "out.img"))
    assert not (tmp_path / "out.img").exists()
    assert disk.restores_exactly(vault, 1, tmp_path / "out.img")


# -- the manifest format -----------------------------------------------------------------------------

@pytest.fixture(params=["plaintext", "encrypted"])
def crypto(request: pytest.FixtureRequest) -> Crypto:
    return Crypto() if request.param == "plaintext" else EncryptedCrypto(MasterKey.generate())


def _manifest(deltas: dict[int, list[Layer]]) -> Manifest:
    ids = [os.urandom(32), ZERO_ID, os.urandom(32)]
    return Manifest(BackupId.parse("j/r/v/vda"), 2 * MIB + 5, MIB, ids, "raw", "2026-11-26T00:00:00.000000Z",
                    deltas=deltas)


def test_manifest_with_deltas_is_version_2_and_round_trips(crypto: Crypto) -> None:
    a, b = os.urandom(32), os.urandom(32)
    m = _manifest({1: [Layer(a, ((0, 4096), (8192, 10)))], 2: [Layer(b, ((0, 5),)), Layer(ZERO_ID, ((1, 2),))]})
    back = decode_manifest(encode_manifest(m, crypto), m.id, crypto)
    assert back.version == 2 and back.deltas == m.deltas and back.chunk_ids == m.chunk_ids
    assert back.blob_ids() == {m.chunk_ids[0], m.chunk_ids[2], a, b}
    assert back.data_bytes() == 2 * MIB + 5 and not back.is_zero(1)
    assert m.content_digest() != _manifest({}).content_digest()


def test_manifest_without_deltas_stays_version_1(crypto: Crypto) -> None:
    m = _manifest({})
    assert m.version == 1
    assert decode_manifest(encode_manifest(m, crypto), m.id, crypto).deltas == {}


@pytest.mark.parametrize("ranges", [((0, 0),), ((4, 4), (2, 4)), ((MIB - 1, 2),), ((0, 4), (3, 4))],
                         ids=["empty", "backwards", "past-the-chunk", "overlapping"])
def test_malformed_deltas_are_vault_corrupt(crypto: Crypto, ranges: tuple[tuple[int, int], ...]) -> None:
    m = _manifest({0: [Layer(os.urandom(32), ranges)]})
    with pytest.raises(VaultCorrupt, match="malformed deltas"):
        decode_manifest(encode_manifest(m, crypto), m.id, crypto)


def test_deltas_on_a_chunk_past_the_end_are_vault_corrupt(crypto: Crypto) -> None:
    m = _manifest({3: [Layer(os.urandom(32), ((0, 1),))]})
    with pytest.raises(VaultCorrupt, match="out of order or range"):
        decode_manifest(encode_manifest(m, crypto), m.id, crypto)


def test_an_incremental_loads_locations_only_of_the_parent_chunks_it_rebuilds(
        vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stored id is loaded (to deduplicate against), locations only of what a rebuild reads: the
    parent's chunk and its layers. A new layer reads nothing of its base."""
    disk = Disk(tmp_path / "disk.img")
    disk.backup(vault, full=True)
    disk.write(MIB + 4 * KIB, os.urandom(16 * KIB))  # chunk 1
    disk.backup(vault)  # chunk 1 now has a layer
    disk.write(MIB + 64 * KIB, os.urandom(600 * KIB))  # chunk 1 again, most of it: rebuilt
    disk.write(3 * MIB + 5, os.urandom(10))  # chunk 3: a layer
    loads: list[tuple[object, object]] = []
    real = Vault.load_index

    def load_index(self: Vault, **kwargs: object) -> object:
        loads.append((kwargs.get("only"), kwargs.get("ids")))
        return real(self, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Vault, "load_index", load_index)
    result = disk.backup(vault)
    parent = manifest(vault, 2)
    ((only, ids),) = loads
    assert ids is True and result.stats.chunks_patched == 1 and result.stats.chunks_delta == 1
    assert only == {parent.chunk_ids[1], *(layer.blob_id for layer in parent.deltas[1])}
    assert disk.restores_exactly(vault, 3, tmp_path / "out.img")


# -- Deltas: layers kept encoded ----------------------------------------------------------------------


def test_deltas_answer_as_the_dict_they_replace_and_encode_as_the_format_says() -> None:
    a, b = os.urandom(32), os.urandom(32)
    layers = {7: [Layer(a, ((0, 4096), (8192, 10)))], 2: [Layer(b, ((0, 5),)), Layer(ZERO_ID, ((1, 2),))]}
    deltas = Deltas(layers)

    assert deltas == layers and dict(deltas.items()) == layers and list(deltas) == [2, 7]
    assert deltas[7] == layers[7] and deltas.get(3) is None and 2 in deltas and 3 not in deltas
    assert list(deltas.indexes(3)) == [7] and list(deltas.layer_counts()) == [(2, 2), (7, 1)]
    assert sorted(deltas.blob_ids()) == sorted([a, b])  # never the zero id
    assert list(deltas.blob_ids(0, 7)) == [b]
    # format.md §8.1: the count, then entry after entry in chunk order
    assert deltas.encode() == (struct.pack("<I", 2) + struct.pack("<II", 2, 2) + b + struct.pack("<III", 1, 0, 5)
                               + ZERO_ID + struct.pack("<III", 1, 1, 2) + struct.pack("<II", 7, 1) + a
                               + struct.pack("<IIIII", 2, 0, 4096, 8192, 10))
    assert b"".join(deltas.pieces()) == deltas.encode() and deltas.encoded_size == len(deltas.encode())
    with pytest.raises(ValueError, match="increasing chunk order"):
        deltas.append(5, layers[7])


def test_a_backup_s_deltas_keep_the_parent_s_and_replace_what_changed() -> None:
    old = [Layer(os.urandom(32), ((0, 1),))]
    parent = Deltas({1: old, 4: old, 6: old, 9: old})
    new = NewEntries()
    for i in (8, 4, 0):  # as workers finish them
        new.add(i, [*parent.get(i, []), Layer(os.urandom(32), ((2, 3),))])

    merged = MergedDeltas(parent, lambda i: i != 6, new)

    assert list(merged) == [0, 1, 4, 8, 9] and merged[1] == merged[9] == old
    assert len(merged[4]) == 2 and merged[4][0] == old[0] and len(merged[0]) == len(merged[8]) == 1


def test_a_new_manifest_s_deltas_stream_the_same_bytes_unbuilt() -> None:
    """What a backup writes (count, size, encoding) comes from the parent's entries and the new ones as they
    are; asking anything else builds the same deltas."""
    old = [Layer(os.urandom(32), ((0, 1),))]
    parent = Deltas({i: old for i in range(0, 400, 3)})
    new = NewEntries()
    for i in (398, 7, 30, 2, 150):  # 30 and 150 replace the parent's
        new.add(i, [Layer(os.urandom(32), ((5, 6),))])

    def keep(i: int) -> bool:
        return i % 2 == 0

    built = MergedDeltas(parent, keep, new)
    built._build()
    lazy = MergedDeltas(parent, keep, new)
    assert len(lazy) == len(built) and lazy.encoded_size == built.encoded_size
    assert b"".join(lazy.pieces()) == built.encode() == lazy.encode() and not lazy._built
    assert lazy == built and lazy._built and list(lazy.indexes()) == list(built.indexes())


def test_new_entries_come_out_in_chunk_order_however_sparse() -> None:
    for indexes in ([5, 3, 9, 0], [10**7, 3, 10**6]):  # dense: a table of positions; sparse: a sort
        new = NewEntries()
        for i in indexes:
            new.add(i, [Layer(ZERO_ID, ((0, i % 7 + 1),))])
        assert [i for i, _ in new.in_order()] == sorted(indexes)
        assert all(bytes(entry) == encode_layers(i, [Layer(ZERO_ID, ((0, i % 7 + 1),))]) for i, entry in new.in_order())


def test_a_large_disk_s_layers_live_in_a_file_and_cost_the_process_8_bytes_a_chunk() -> None:
    layers = {i: [Layer(os.urandom(32), ((4096, 4096),))] for i in range(0, 200_000, 2)}
    deltas = Deltas(layers)

    assert deltas._store.in_file  # 5 MB of entries: past the 1 MiB kept in memory
    held = deltas._index.itemsize * len(deltas._index) + deltas._offset.itemsize * len(deltas)
    assert held / len(deltas) == 8  # as Layer objects in a dict: ~425; encoded in memory: 60
    assert deltas[199_998] == layers[199_998] and 3 not in deltas and deltas.get(1000) == layers[1000]
    assert dict(deltas.items()) == layers and list(deltas.blob_ids(10, 14)) == [layers[10][0].blob_id,
                                                                               layers[12][0].blob_id]
    assert len(deltas.encode()) == deltas.encoded_size == 4 + 52 * len(layers)


def test_new_entries_of_a_large_disk_live_in_a_file_and_merge_in_order() -> None:
    new = NewEntries()
    order = list(range(0, 100_000, 2))
    order[1000:1010] = reversed(order[1000:1010])  # workers finish a few out of order
    for i in order:
        new.add(i, [Layer(ZERO_ID, ((0, i % 7 + 1),))])
    merged = MergedDeltas(Deltas({1: [Layer(ZERO_ID, ((0, 1),))]}), lambda i: True, new)

    assert new._store.in_file and len(merged) == 50_001
    assert list(merged.indexes(0, 6)) == [0, 1, 2, 4] and merged[2010] == [Layer(ZERO_ID, ((0, 2010 % 7 + 1),))]


def test_deltas_read_a_piece_at_a_time_are_the_same_and_are_checked() -> None:
    """A large manifest's deltas are read as they are decompressed, never held whole."""
    layers = {i: [Layer(os.urandom(32), ((i % 9, 100), (200, 3)))] for i in range(1, 60_000, 3)}
    encoded = Deltas(layers).encode()

    def reader(data: bytes) -> Callable[[int], bytes]:
        at = 0

        def read(n: int) -> bytes:
            nonlocal at
            at += n
            assert n <= 1 << 20  # pieces, not the whole
            return data[at - n : at]
        return read

    def length(i: int) -> int:
        return 1 << 20

    read = Deltas.read(reader(encoded), len(encoded), 60_000, length, "b")
    assert read == layers and read.encode() == encoded
    for damaged in (encoded[:-1], encoded + b"\0"):
        with pytest.raises(VaultCorrupt, match=r"truncated|trailing"):
            Deltas.read(reader(damaged), len(damaged), 60_000, length, "b")


def test_a_spilling_buffer_reads_back_across_memory_and_file() -> None:
    buf = SpillingBuffer("test", limit=100)
    data = bytes(range(256)) * 4
    for k in range(0, len(data), 10):
        assert buf.append(data[k : k + 10]) == k
    assert buf.in_file and buf.size == len(data)
    for pos, n in ((0, 5), (95, 20), (1000, 24), (3, 1000)):
        assert bytes(buf.read(pos, n)) == data[pos : pos + n]
    assert b"".join(bytes(p) for p in buf.pieces(7, piece=64)) == data[7:]
