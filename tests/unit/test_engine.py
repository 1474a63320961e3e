"""The backup and restore engine through its Python API: what a caller (the CLI, the service) gets.

Vaults live in memory (MemoryBackend) or in a directory (LocalBackend); images are real
sparse files made by bench/imagegen.py; qcow2 goes through real qemu-img and qemu-nbd.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import MIB, blake3_file, imagegen
from raksha.domain.errors import AlreadyExists, ChunkMissing, InvalidInput, NotFound
from raksha.vault import repository
from raksha.vault.backends.local import LocalBackend
from raksha.vault.backends.memory import MemoryBackend
from raksha.vault.engine import backup as backup_module
from raksha.vault.engine import restore as restore_module
from raksha.vault.engine import seen_ids
from raksha.vault.engine.backup import MAX_READERS, BackupResult, backup_disk, default_threads, reader_count
from raksha.vault.engine.changes import chunks_touching
from raksha.vault.engine.restore import RestoreResult, restore_backup
from raksha.vault.format import sorted_ids
from raksha.vault.format.chunk_ids import ChunkIds
from raksha.vault.format.config import VaultConfig
from raksha.vault.format.constants import ZERO_ID
from raksha.vault.format.index import index_key
from raksha.vault.format.keys import KdfParams, Secret
from raksha.vault.format.manifest import Manifest
from raksha.vault.format.naming import BackupId
from raksha.vault.format.pack import pack_key
from raksha.vault.locks import LockKind
from raksha.vault.operations.gc import collect_garbage
from raksha.vault.repository import Vault
from raksha.vault.sources.base import DiskSource
from raksha.vault.sources.open import open_source

K64 = 64 << 10
SECRET = Secret(passphrase=b"engine test")
MakeVault = Callable[..., Vault]


@pytest.fixture(params=["memory", "local"])
def new_vault(request: pytest.FixtureRequest, tmp_path: Path) -> MakeVault:
    """``new_vault(chunk_size=1 MiB, encrypted=False, pack_size=32 MiB)`` in memory or in a directory."""
    count = [0]

    def make(chunk_size: int = MIB, encrypted: bool = False, pack_size: int = 32 * MIB) -> Vault:
        count[0] += 1
        if request.param == "memory":
            backend = MemoryBackend()
        else:
            backend = LocalBackend(tmp_path / f"vault{count[0]}", create=True)
        config = VaultConfig.new(chunk_size=chunk_size, pack_size=pack_size, encrypted=encrypted)
        return Vault.init(backend, config, SECRET if encrypted else None, KdfParams(memory_kib=8192))

    return make


def backup(vault: Vault, image: Path, backup_id: str, **kwargs: object) -> BackupResult:
    """Back up the image file at ``image`` (any format qemu knows) as ``backup_id``."""
    source = open_source(str(image))
    try:
        parent = kwargs.pop("parent", None)
        return backup_disk(vault, source, BackupId.parse(backup_id),
                           parent=BackupId.parse(str(parent)) if parent else None, **kwargs)  # type: ignore[arg-type]
    finally:
        source.close()


def restore(vault: Vault, backup_id: str, output: Path, fmt: str = "raw") -> RestoreResult:
    return restore_backup(vault, BackupId.parse(backup_id), str(output), fmt=fmt)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def data_bytes(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return sum(end - start for start, end in imagegen.data_segments(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def stored_pack_bytes(vault: Vault) -> int:
    return sum(size for _, size, _ in vault.iter_packs())


# -- full backups ---------------------------------------------------------------------------------


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_full_backup_restores_bit_exact(new_vault: MakeVault, make_image: Callable[..., Path], outputs: Path,
                                        encrypted: bool) -> None:
    image = make_image("disk.img", 16 * MIB, seed=1)
    vault = new_vault(encrypted=encrypted)

    result = backup(vault, image, "job1/run1/vm1/vda")
    restored = restore(vault, "job1/run1/vm1/vda", outputs / "vda.img")

    assert blake3_file(outputs / "vda.img") == blake3_file(image)
    s = result.stats
    assert result.kind == "full" and result.parent is None
    assert s.virtual_size == 16 * MIB and s.chunks_total == 16
    assert s.chunks_new + s.chunks_deduplicated + s.chunks_zero == s.chunks_total
    assert s.chunks_new > 0 and s.bytes_stored > 0
    assert s.bytes_read <= data_bytes(image) + s.chunks_total * MIB  # holes are not read...
    assert s.bytes_read < 16 * MIB  # ...and this image has whole-chunk holes
    # bytes_stored is what the packs hold, less their headers
    assert s.bytes_stored <= stored_pack_bytes(vault) <= s.bytes_stored + s.packs_written * 4096 + s.chunks_new * 64
    assert restored.content_digest == result.content_digest
    assert restored.chunks_verified == s.chunks_new
    assert 0 < restored.seconds < 600 and 0 < s.seconds < 600
    # the restored file is sparse where the backup had zero chunks
    assert allocated(outputs / "vda.img") <= (s.chunks_total - s.chunks_zero) * MIB


@pytest.mark.parametrize("threads", [None, 1, 5])
def test_chunks_larger_than_a_read_span_restore_with_any_thread_count(
        new_vault: MakeVault, tmp_path: Path, outputs: Path, threads: int | None) -> None:
    """A blob of an incompressible 4 MiB chunk is larger than the readers' 2 MiB span buffers: they grow for
    it. ``threads`` is split among readers, decoders and writers, at least one each."""
    vault = new_vault(chunk_size=4 * MIB)
    image = tmp_path / "random.img"
    image.write_bytes(os.urandom(12 * MIB) + bytes(4 * MIB))
    backup(vault, image, "j/r/vm/vda")

    restore_backup(vault, BackupId.parse("j/r/vm/vda"), str(outputs / "out.img"), threads=threads)

    assert blake3_file(outputs / "out.img") == blake3_file(image)
    assert allocated(outputs / "out.img") <= 12 * MIB + 64 * 1024


def test_restore_stages_split_the_threads_asked_for() -> None:
    assert restore_module.restore_stages(None) == (2, os.cpu_count() or 1, 2)
    assert restore_module.restore_stages(1) == (1, 1, 1)
    assert restore_module.restore_stages(6) == (2, 2, 2)
    assert restore_module.restore_stages(8) == (2, 4, 2)


def test_backup_metadata_and_manifest_describe_the_backup(new_vault: MakeVault,
                                                          make_image: Callable[..., Path]) -> None:
    image = make_image("disk.img", 8 * MIB)
    vault = new_vault()
    result = backup(vault, image, "job1/run1/vm1/vda", hints={"tenant": "acme"})

    manifest = vault.read_manifest(BackupId.parse("job1/run1/vm1/vda"))
    meta = vault.read_metadata(BackupId.parse("job1/run1/vm1/vda"))
    assert manifest.virtual_size == 8 * MIB and manifest.source_format == "raw"
    assert manifest.content_digest() == result.content_digest == meta["checksums"]["content_digest"]
    assert meta["kind"] == "full" and meta["parent"] is None and meta["changed_extents"] is None
    assert meta["hints"] == {"tenant": "acme"}
    assert meta["source"] == {"path": str(image), "format": "raw", "virtual_size": 8 * MIB}
    assert meta["stats"]["bytes_stored"] == result.stats.bytes_stored
    assert vault.backup_ids() == [BackupId.parse("job1/run1/vm1/vda")]


def test_a_backup_id_is_written_once(new_vault: MakeVault, make_image: Callable[..., Path]) -> None:
    image = make_image("disk.img", 4 * MIB)
    vault = new_vault()
    backup(vault, image, "job1/run1/vm1/vda")
    with pytest.raises(AlreadyExists) as caught:
        backup(vault, image, "job1/run1/vm1/vda")
    assert caught.value.code == "BACKUP_EXISTS"


def test_backups_under_a_lock_the_caller_holds_take_none_of_their_own(new_vault: MakeVault,
                                                                      make_image: Callable[..., Path]) -> None:
    """A group's run holds one shared lock for all its disks; a backup given a lock that is not a held
    shared lock of its own vault refuses to start."""
    image = make_image("disk.img", 4 * MIB)
    vault = new_vault()
    taken = []
    acquire = vault.locks.acquire
    vault.locks.acquire = lambda *a, **k: taken.append(a) or acquire(*a, **k)  # type: ignore[method-assign]
    with acquire(LockKind.SHARED, "backup run job1/run1") as lock:
        backup(vault, image, "job1/run1/vm1/vda", lock=lock)
        backup(vault, image, "job1/run1/vm1/vdb", lock=lock)
        assert [info.operation for info in vault.locks.active()] == ["backup run job1/run1"]
    assert taken == []
    other = new_vault()
    with acquire(LockKind.MAINTENANCE, "prune") as maintenance, \
            other.locks.acquire(LockKind.SHARED, "backup run job1/run2") as others:
        for refused in (lock, maintenance, others):  # released; not a shared one; another vault's
            with pytest.raises(InvalidInput) as caught:
                backup(vault, image, "job1/run2/vm1/vda", lock=refused)
            assert caught.value.code == "LOCK_NOT_HELD"
    backup(vault, image, "job1/run2/vm1/vda")
    assert [a[1] for a in taken] == ["backup job1/run2/vm1/vda"]
    assert [str(i) for i in vault.backup_ids()] == ["job1/run1/vm1/vda", "job1/run1/vm1/vdb", "job1/run2/vm1/vda"]


def test_what_a_run_reads_ahead_gives_the_backups_it_would_have_read(
        new_vault: MakeVault, make_image: Callable[..., Path],
        make_changed_copy: Callable[..., tuple[Path, list[list[int]]]], outputs: Path) -> None:
    """A group's run reads the stored ids and the parents' manifests under its lock while its VMs are frozen
    (``preread``). Its backups give what they give without it; chunks another disk of the run stored after
    the read ahead are still stored once; a parent that was not read ahead is read as before."""
    base = make_image("base.img", 16 * MIB, seed=5)
    changed, extents = make_changed_copy(base, "changed.img", 0.02)
    vault = new_vault()
    backup(vault, base, "job1/run1/vm1/vda")
    backup(vault, base, "job1/run1/vm1/vdb")
    ids = [BackupId.parse("job1/run1/vm1/vda"), BackupId.parse("job1/run1/vm1/nothing-here")]
    with vault.locks.acquire(LockKind.SHARED, "backup run job1/run2") as lock:
        ahead = backup_module.preread(vault, {b: 1000 for b in ids}, lock)
        assert ahead is not None and ahead.has(ids[0]) and not ahead.has(ids[1])
        try:
            incr = backup(vault, changed, "job1/run2/vm1/vda", parent="job1/run1/vm1/vda", lock=lock,
                          changed_extents=[tuple(e) for e in extents], read_ahead=ahead)
            # vdb's parent was not read ahead: read now; its change is vda's, which vda's backup just stored
            again = backup(vault, changed, "job1/run2/vm1/vdb", parent="job1/run1/vm1/vdb", lock=lock,
                           changed_extents=[tuple(e) for e in extents], read_ahead=ahead)
            copy = backup(vault, base, "job1/run2/vm2/vda", lock=lock, read_ahead=ahead)
        finally:
            ahead.close()
    assert incr.kind == "incremental" and incr.stats.bytes_stored > 0
    assert again.stats.bytes_stored == 0 and again.stats.chunks_deduplicated == incr.stats.chunks_new
    assert copy.stats.bytes_stored == 0
    restore(vault, "job1/run2/vm1/vdb", outputs / "vdb.img")
    assert blake3_file(outputs / "vdb.img") == blake3_file(changed)
    alone = new_vault()
    backup(alone, base, "job1/run1/vm1/vda")
    without = backup(alone, changed, "job1/run2/vm1/vda", parent="job1/run1/vm1/vda",
                     changed_extents=[tuple(e) for e in extents])
    assert incr.content_digest == without.content_digest
    assert (incr.stats.bytes_read, incr.stats.chunks_new) == (without.stats.bytes_read, without.stats.chunks_new)


def test_a_run_reads_ahead_only_the_manifests_its_first_transfers_need(
        new_vault: MakeVault, make_image: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Small manifests, a few, within a budget: a group of many VMs with large disks does not wait for (or
    hold) all its parents' manifests before its first transfer; the others are read by their backups."""
    image = make_image("disk.img", 2 * MIB)
    vault = new_vault()
    ids = [BackupId.parse(f"job1/run1/vm{k}/vda") for k in range(5)]
    for b in ids:
        backup(vault, image, str(b))
    monkeypatch.setattr(backup_module, "READ_AHEAD_MANIFESTS", 3)
    monkeypatch.setattr(backup_module, "READ_AHEAD_BYTES", 10_000)
    sizes = {ids[0]: 1000, ids[1]: repository.MANIFEST_WHOLE + 1, ids[2]: 2000, ids[3]: 3000, ids[4]: 100}
    with vault.locks.acquire(LockKind.SHARED, "backup run job1/run2") as lock:
        ahead = backup_module.preread(vault, sizes, lock)
        assert ahead is not None
        # vm1's is too large to read whole; vm4's is past the count (three chosen: vm0, vm2, vm3)
        assert [ahead.has(b) for b in ids] == [True, False, True, True, False]
        ahead.close()
        sizes[ids[2]] = 9500  # now past the bytes: reading ahead stops there, in order
        ahead = backup_module.preread(vault, sizes, lock)
        assert ahead is not None and [ahead.has(b) for b in ids] == [True, False, False, False, False]
        ahead.close()


def test_reading_ahead_needs_the_run_s_lock(new_vault: MakeVault, make_image: Callable[..., Path]) -> None:
    image = make_image("disk.img", 4 * MIB)
    vault, other = new_vault(), new_vault()
    with vault.locks.acquire(LockKind.SHARED, "backup run job1/run1") as lock:
        ahead = backup_module.preread(vault, {}, lock)
        assert ahead is not None
        with pytest.raises(InvalidInput) as caught:  # what was read ahead goes with the lock it was read under
            backup(vault, image, "job1/run1/vm1/vda", read_ahead=ahead)
        assert caught.value.code == "LOCK_NOT_HELD"
        with other.locks.acquire(LockKind.SHARED, "backup run job1/run1") as others, pytest.raises(InvalidInput):
            backup(other, image, "job1/run1/vm1/vda", lock=others, read_ahead=ahead)
        ahead.close()
    with pytest.raises(InvalidInput) as caught:
        backup_module.preread(vault, {}, lock)  # released
    assert caught.value.code == "LOCK_NOT_HELD"


@pytest.mark.parametrize("chunk_size", [K64, 4 * MIB], ids=["64K", "4M"])
def test_chunk_sizes(new_vault: MakeVault, make_image: Callable[..., Path], outputs: Path, chunk_size: int) -> None:
    image = make_image("disk.img", 24 * MIB, seed=3)
    vault = new_vault(chunk_size=chunk_size)

    result = backup(vault, image, "job1/run1/vm1/vda")
    restore(vault, "job1/run1/vm1/vda", outputs / "out.img")

    assert blake3_file(outputs / "out.img") == blake3_file(image)
    assert result.stats.chunks_total == 24 * MIB // chunk_size
    assert vault.read_manifest(BackupId.parse("job1/run1/vm1/vda")).chunk_size == chunk_size


def test_disk_size_not_a_multiple_of_the_chunk_size(new_vault: MakeVault, make_image: Callable[..., Path],
                                                    outputs: Path) -> None:
    size = 8 * MIB + 3 * 4096 + 512
    image = make_image("odd.img", size, seed=4)
    with open(image, "r+b") as f:  # make sure the short last chunk holds data
        f.seek(size - 700)
        f.write(b"tail!" * 140)
    vault = new_vault()

    result = backup(vault, image, "job1/run1/vm1/vda")
    restore(vault, "job1/run1/vm1/vda", outputs / "odd.img")

    manifest = vault.read_manifest(BackupId.parse("job1/run1/vm1/vda"))
    assert result.stats.chunks_total == manifest.chunk_count == 9
    assert manifest.chunk_length(8) == 3 * 4096 + 512 and manifest.chunk_ids[8] != ZERO_ID
    assert os.path.getsize(outputs / "odd.img") == size
    assert blake3_file(outputs / "odd.img") == blake3_file(image)


def test_all_zero_chunks_are_not_stored(new_vault: MakeVault, tmp_path: Path, outputs: Path) -> None:
    """Zeros written out (not holes) are read, recognised and recorded as the zero id, never stored."""
    image = tmp_path / "zeros.img"
    with open(image, "wb") as f:
        f.write(bytes(3 * MIB))  # allocated zeros
        f.write(b"data" * (MIB // 4))
        f.write(bytes(2 * MIB))
        f.write(b"more" * (MIB // 4))
    assert allocated(image) >= 7 * MIB
    vault = new_vault()

    result = backup(vault, image, "job1/run1/vm1/vda")

    manifest = vault.read_manifest(BackupId.parse("job1/run1/vm1/vda"))
    assert [cid == ZERO_ID for cid in manifest.chunk_ids] == [True, True, True, False, True, True, False]
    assert result.stats.chunks_zero == 5 and result.stats.chunks_new == 2
    assert result.stats.bytes_read == 7 * MIB  # read, since the file says they hold data
    index = vault.load_index()
    assert ZERO_ID not in index and len(index.locations) == 2
    restore(vault, "job1/run1/vm1/vda", outputs / "zeros.img")
    assert blake3_file(outputs / "zeros.img") == blake3_file(image)


def test_an_all_zero_disk_stores_nothing(new_vault: MakeVault, tmp_path: Path, outputs: Path) -> None:
    image = tmp_path / "blank.img"
    image.write_bytes(bytes(4 * MIB))
    vault = new_vault()

    result = backup(vault, image, "job1/run1/vm1/vda")

    assert result.stats.bytes_stored == 0 and result.stats.packs_written == 0
    assert list(vault.iter_packs()) == []
    restore(vault, "job1/run1/vm1/vda", outputs / "blank.img")
    assert (outputs / "blank.img").read_bytes() == bytes(4 * MIB)


# -- incrementals ---------------------------------------------------------------------------------


def test_incremental_reads_only_the_changed_chunks(new_vault: MakeVault, make_image: Callable[..., Path],
                                                   make_changed_copy: Callable[..., tuple[Path, list[list[int]]]],
                                                   outputs: Path) -> None:
    base = make_image("base.img", 32 * MIB, seed=5)
    changed, extents = make_changed_copy(base, "changed.img", fraction=0.01, seed=6)
    changed_bytes = sum(length for _, length in extents)
    vault = new_vault(chunk_size=K64)
    full = backup(vault, base, "job1/run1/vm1/vda")

    inc = backup(vault, changed, "job1/run2/vm1/vda", parent="job1/run1/vm1/vda",
                 changed_extents=[(o, n) for o, n in extents])

    s = inc.stats
    assert inc.kind == "incremental" and str(inc.parent) == "job1/run1/vm1/vda"
    assert s.bytes_read <= 1.1 * changed_bytes + K64 * len(extents)
    assert s.bytes_read < full.stats.bytes_read / 5
    assert s.chunks_from_parent > 0
    assert s.chunks_read <= len(extents) * 17  # an extent is at most 1 MiB: 16 chunks, 17 if unaligned
    assert s.bytes_stored <= changed_bytes + K64 * len(extents)
    restore(vault, "job1/run2/vm1/vda", outputs / "new.img")
    restore(vault, "job1/run1/vm1/vda", outputs / "old.img")
    assert blake3_file(outputs / "new.img") == blake3_file(changed)
    assert blake3_file(outputs / "old.img") == blake3_file(base)
    meta = vault.read_metadata(BackupId.parse("job1/run2/vm1/vda"))
    assert meta["kind"] == "incremental" and meta["parent"] == "job1/run1/vm1/vda"
    assert meta["changed_extents"] == {"count": len(extents), "bytes": changed_bytes}


def test_small_reads_get_more_readers_so_that_more_of_them_are_in_flight() -> None:
    # Whole chunks: half the threads read. Changes of ~100 kB: enough readers for ~2 MiB in flight.
    assert reader_count(4, reads=1000, read_bytes=1000 * MIB) == 2
    assert reader_count(4, reads=200, read_bytes=200 * 100_000) == MAX_READERS
    assert reader_count(4, reads=200, read_bytes=200 * 512 * 1024) == 4
    assert reader_count(32, reads=200, read_bytes=200 * 4096) == 16  # never fewer than half the threads
    assert reader_count(1, reads=0, read_bytes=0) == 1
    assert reader_count(1, reads=200, read_bytes=200 * 4096, limit=1) == 1  # the caller's limit
    assert reader_count(4, reads=200, read_bytes=200 * 4096, limit=4) == 4


def test_an_incremental_of_small_changes_reads_them_with_more_readers(
        monkeypatch: pytest.MonkeyPatch, make_image: Callable[..., Path],
        make_changed_copy: Callable[..., tuple[Path, list[list[int]]]], tmp_path: Path) -> None:
    readers: list[int] = []
    pipeline = backup_module.run_pipeline
    monkeypatch.setattr(backup_module, "run_pipeline",
                        lambda *a, **k: readers.append(k["readers"]) or pipeline(*a, **k))
    base = make_image("base.img", 32 * MIB, seed=5)
    changed, extents = make_changed_copy(base, "changed.img", fraction=0.01, seed=6)
    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new())
    backup_disk(vault, open_source(str(base)), BackupId.parse("j/r1/vm/vda"))
    backup_disk(vault, open_source(str(changed)), BackupId.parse("j/r2/vm/vda"),
                parent=BackupId.parse("j/r1/vm/vda"), changed_extents=[(o, n) for o, n in extents])
    backup_disk(vault, open_source(str(changed)), BackupId.parse("j/r3/vm/vda"), threads=2,
                parent=BackupId.parse("j/r2/vm/vda"), changed_extents=[(o, n) for o, n in extents])
    assert readers == [max(1, default_threads() // 2), MAX_READERS, 2]  # a thread count set is a limit


def test_incremental_without_extents_rereads_everything_and_matches(
        new_vault: MakeVault, make_image: Callable[..., Path],
        make_changed_copy: Callable[..., tuple[Path, list[list[int]]]], outputs: Path) -> None:
    base = make_image("base.img", 16 * MIB, seed=5)
    changed, _ = make_changed_copy(base, "changed.img", fraction=0.02, seed=6)
    vault = new_vault()
    backup(vault, base, "job1/run1/vm1/vda")

    inc = backup(vault, changed, "job1/run2/vm1/vda", parent="job1/run1/vm1/vda")

    assert inc.kind == "full"  # no change tracking: a full read, deduplicated against everything
    assert inc.stats.chunks_deduplicated > 0 and inc.stats.chunks_from_parent == 0
    restore(vault, "job1/run2/vm1/vda", outputs / "new.img")
    assert blake3_file(outputs / "new.img") == blake3_file(changed)


class CountingReads:
    """The source it wraps, counting the engine's reads of it (from any reader thread)."""

    def __init__(self, source: DiskSource) -> None:
        self.source = source
        self.reads: list[int] = []  # offsets; list.append is atomic

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)

    def pread(self, offset: int, length: int) -> bytes:
        self.reads.append(offset)
        return self.source.pread(offset, length)

    def readinto(self, offset: int, out: memoryview) -> None:
        self.reads.append(offset)
        readinto = getattr(self.source, "readinto", None)
        if readinto is not None:
            readinto(offset, out)
        else:
            out[:] = self.source.pread(offset, len(out))


def test_reads_done_comes_after_the_last_read_and_before_the_commit(
        new_vault: MakeVault, make_image: Callable[..., Path],
        make_changed_copy: Callable[..., tuple[Path, list[list[int]]]]) -> None:
    base = make_image("base.img", 8 * MIB, seed=5)
    changed, extents = make_changed_copy(base, "changed.img", fraction=0.05, seed=6)
    vault = new_vault(chunk_size=K64)
    for backup_id, parent, changes in (("job1/run1/vm1/vda", None, None),
                                       ("job1/run2/vm1/vda", "job1/run1/vm1/vda", [(o, n) for o, n in extents])):
        source = CountingReads(open_source(str(changed if parent else base)))
        bid = BackupId.parse(backup_id)
        events: list[tuple[int, bool]] = []

        def done(s: CountingReads = source, b: BackupId = bid, e: list[tuple[int, bool]] = events) -> None:
            e.append((len(s.reads), vault.has_backup(b)))

        try:
            backup_disk(vault, source, bid, parent=BackupId.parse(parent) if parent else None,
                        changed_extents=changes, reads_done=done)
        finally:
            source.close()
        assert source.reads and events == [(len(source.reads), False)]  # once, after every read, before the commit
        assert vault.has_backup(bid)


def test_changed_extents_need_a_parent(new_vault: MakeVault, make_image: Callable[..., Path]) -> None:
    vault = new_vault()
    with pytest.raises(InvalidInput) as caught:
        backup(vault, make_image("a.img", 2 * MIB), "job1/run1/vm1/vda", changed_extents=[(0, 4096)])
    assert caught.value.code == "PARENT_REQUIRED"
    with pytest.raises(NotFound) as missing:
        backup(vault, make_image("a.img", 2 * MIB), "job1/run1/vm1/vda", parent="job1/run0/vm1/vda",
               changed_extents=[(0, 4096)])
    assert missing.value.code == "BACKUP_NOT_FOUND"


def test_every_backup_restores_after_its_parent_is_deleted(
        new_vault: MakeVault, make_image: Callable[..., Path],
        make_changed_copy: Callable[..., tuple[Path, list[list[int]]]], outputs: Path) -> None:
    """Incrementals are logically full: deleting the parent and collecting its garbage loses nothing."""
    base = make_image("v1.img", 16 * MIB, seed=7)
    v2, ext2 = make_changed_copy(base, "v2.img", fraction=0.3, seed=8)
    v3, ext3 = make_changed_copy(v2, "v3.img", fraction=0.3, seed=9)
    vault = new_vault(chunk_size=K64, pack_size=2 * MIB)
    backup(vault, base, "job1/run1/vm1/vda")
    backup(vault, v2, "job1/run2/vm1/vda", parent="job1/run1/vm1/vda", changed_extents=ext2)
    backup(vault, v3, "job1/run3/vm1/vda", parent="job1/run2/vm1/vda", changed_extents=ext3)

    vault.delete_backup(BackupId.parse("job1/run1/vm1/vda"))
    first = collect_garbage(vault, grace=0, max_wait=5, poll=0.05)
    assert first.bytes_freed > 0
    restore(vault, "job1/run2/vm1/vda", outputs / "v2.img")
    assert blake3_file(outputs / "v2.img") == blake3_file(v2)

    vault.delete_backup(BackupId.parse("job1/run2/vm1/vda"))
    second = collect_garbage(vault, grace=0, max_wait=5, poll=0.05)
    assert second.bytes_freed > 0
    restore(vault, "job1/run3/vm1/vda", outputs / "v3.img")
    assert blake3_file(outputs / "v3.img") == blake3_file(v3)
    with pytest.raises(NotFound):
        restore(vault, "job1/run1/vm1/vda", outputs / "v1.img")


def test_incremental_of_a_grown_disk(new_vault: MakeVault, make_image: Callable[..., Path], outputs: Path) -> None:
    """The new tail is read even though no changed extent names it, and so is the parent's short last chunk."""
    old_size = 8 * MIB + 4096
    base = make_image("base.img", old_size, seed=10)
    with open(base, "r+b") as f:
        f.seek(old_size - 4096)
        f.write(b"old tail" * 512)
    grown = base.parent / "grown.img"
    shutil.copyfile(base, grown)
    with open(grown, "r+b") as f:
        f.truncate(12 * MIB)
        f.seek(old_size)
        f.write(b"grew into the old last chunk" * 1000)
        f.seek(10 * MIB)
        f.write(os.urandom(MIB))
        f.seek(MIB)
        f.write(b"changed in place" * 256)
    vault = new_vault()
    backup(vault, base, "job1/run1/vm1/vda")

    inc = backup(vault, grown, "job1/run2/vm1/vda", parent="job1/run1/vm1/vda", changed_extents=[(MIB, 4096)])

    assert inc.stats.virtual_size == 12 * MIB and inc.stats.chunks_total == 12
    # Read: chunk 1 (changed), 8 (the parent's short last chunk) and 10 (new data); 9 and 11 are holes.
    assert inc.stats.chunks_read == 3
    restore(vault, "job1/run2/vm1/vda", outputs / "grown.img")
    assert blake3_file(outputs / "grown.img") == blake3_file(grown)


def test_incremental_of_a_shrunk_disk(new_vault: MakeVault, make_image: Callable[..., Path], outputs: Path) -> None:
    base = make_image("base.img", 8 * MIB, seed=11)
    shrunk = base.parent / "shrunk.img"
    shutil.copyfile(base, shrunk)
    os.truncate(shrunk, 5 * MIB + 8192)
    vault = new_vault()
    backup(vault, base, "job1/run1/vm1/vda")

    inc = backup(vault, shrunk, "job1/run2/vm1/vda", parent="job1/run1/vm1/vda", changed_extents=[])

    assert inc.stats.chunks_total == 6
    restore(vault, "job1/run2/vm1/vda", outputs / "shrunk.img")
    assert blake3_file(outputs / "shrunk.img") == blake3_file(shrunk)


def test_incremental_rereads_a_parent_chunk_missing_from_the_index(
        new_vault: MakeVault, make_image: Callable[..., Path], outputs: Path) -> None:
    """A chunk the parent used but the vault no longer holds is read and stored again, not referenced."""
    image = make_image("disk.img", 16 * MIB, seed=12)
    vault = new_vault(chunk_size=K64, pack_size=MIB)
    backup(vault, image, "job1/run1/vm1/vda")
    # Lose one pack and its index entries, as if a gc or an operator had removed them.
    index = vault.load_index()
    victim = next(iter(index.locations.values())).pack_id
    lost = {cid: loc for cid, loc in index.locations.items() if loc.pack_id == victim}
    vault.write_index({cid: loc for cid, loc in index.locations.items() if loc.pack_id != victim},
                      [bytes.fromhex(i) for i in index.index_ids])
    for index_id in index.index_ids:
        vault.backend.delete(index_key(index_id))
    vault.backend.delete(pack_key(victim.hex()))

    inc = backup(vault, image, "job1/run2/vm1/vda", parent="job1/run1/vm1/vda", changed_extents=[])

    assert inc.stats.chunks_read == len(lost) and inc.stats.chunks_new == len(lost)
    assert inc.stats.bytes_read == len(lost) * K64
    assert set(lost) <= set(vault.load_index().locations)
    restore(vault, "job1/run2/vm1/vda", outputs / "disk.img")
    assert blake3_file(outputs / "disk.img") == blake3_file(image)


def test_a_chunk_changed_in_part_whose_parent_copy_is_gone_is_read_whole(
        new_vault: MakeVault, make_image: Callable[..., Path], outputs: Path) -> None:
    """Neither rebuilt on nor layered over a parent chunk the vault no longer holds: read from the source."""
    image = make_image("disk.img", 16 * MIB, seed=21)
    vault = new_vault(chunk_size=K64, pack_size=MIB)
    backup(vault, image, "job1/run1/vm1/vda")
    ids = vault.read_manifest(BackupId.parse("job1/run1/vm1/vda")).chunk_ids
    index = vault.load_index()
    victim = next(iter(index.locations.values())).pack_id
    lost = {cid for cid, loc in index.locations.items() if loc.pack_id == victim}
    gone = next(i for i in range(len(ids)) if ids[i] in lost)
    vault.write_index({cid: loc for cid, loc in index.locations.items() if loc.pack_id != victim},
                      [bytes.fromhex(i) for i in index.index_ids])
    for index_id in index.index_ids:
        vault.backend.delete(index_key(index_id))
    vault.backend.delete(pack_key(victim.hex()))
    # 4 KiB of that chunk change, and 4 KiB of one whose parent copy is still there.
    kept = next(i for i in range(len(ids)) if ids[i] != ZERO_ID and ids[i] not in lost)
    changes = [(gone * K64 + 8192, 4096), (kept * K64 + 8192, 4096)]
    with open(image, "r+b") as f:
        for off, n in changes:
            f.seek(off)
            f.write(os.urandom(n))

    inc = backup(vault, image, "job1/run2/vm1/vda", parent="job1/run1/vm1/vda", changed_extents=changes)

    # The lost pack's chunks are read whole (the changed one among them); the other change is a layer.
    assert inc.stats.bytes_read == len(lost) * K64 + 4096
    assert inc.stats.chunks_delta == 1 and inc.stats.chunks_patched == 0
    restore(vault, "job1/run2/vm1/vda", outputs / "disk.img")
    assert blake3_file(outputs / "disk.img") == blake3_file(image)


# -- deduplication --------------------------------------------------------------------------------


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_identical_disks_of_two_vms_are_stored_once(new_vault: MakeVault, make_image: Callable[..., Path],
                                                    outputs: Path, encrypted: bool) -> None:
    image = make_image("vm1.img", 16 * MIB, seed=13)
    copy = image.parent / "vm2.img"
    shutil.copyfile(image, copy)
    vault = new_vault(encrypted=encrypted)
    first = backup(vault, image, "job1/run1/vm1/vda")
    packs_before = stored_pack_bytes(vault)

    second = backup(vault, copy, "job1/run1/vm2/vda")

    assert second.stats.bytes_stored == 0 and second.stats.chunks_new == 0
    assert second.stats.chunks_deduplicated == first.stats.chunks_new
    assert second.content_digest == first.content_digest
    assert stored_pack_bytes(vault) == packs_before
    restore(vault, "job1/run1/vm2/vda", outputs / "vm2.img")
    assert blake3_file(outputs / "vm2.img") == blake3_file(image)


def test_a_chunk_seen_again_long_after_is_stored_once(new_vault: MakeVault, tmp_path: Path, outputs: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The ids a backup stored go to runs on disk every 4 here (as every 65,536 on a large disk): a chunk
    that comes back after many others is still found there."""
    monkeypatch.setattr(seen_ids, "RUN", 4)
    chunks = [os.urandom(K64) for _ in range(12)]
    order = [*range(12), 0, 5, 11, 3, 3]
    image = tmp_path / "repeats.img"
    image.write_bytes(b"".join(chunks[i] for i in order))
    vault = new_vault(chunk_size=K64)

    result = backup(vault, image, "job1/run1/vm1/vda", threads=1)

    assert result.stats.chunks_new == 12 and result.stats.chunks_deduplicated == 5
    restore(vault, "job1/run1/vm1/vda", outputs / "repeats.img")
    assert blake3_file(outputs / "repeats.img") == blake3_file(image)


def test_a_large_vault_gives_a_backup_its_stored_ids_from_a_file(
        new_vault: MakeVault, make_image: Callable[..., Path],
        make_changed_copy: Callable[..., tuple[Path, list[list[int]]]], outputs: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past IDS_IN_MEMORY stored chunks (8 here, 524,288 really) a backup deduplicates against the vault's
    ids sorted in a temporary file: a clone and an incremental store what they did in memory."""
    monkeypatch.setattr(repository, "IDS_IN_MEMORY", 8)
    monkeypatch.setattr(sorted_ids, "PARTITION", 16)  # 16 partitions, each several blocks of 4 ids
    monkeypatch.setattr(sorted_ids, "FENCE", 4)
    built: list[sorted_ids.DiskIdSet] = []
    finish = sorted_ids.DiskIdSet.finish
    monkeypatch.setattr(sorted_ids.DiskIdSet, "finish", lambda self: built.append(self) or finish(self))
    image = make_image("base.img", 16 * MIB, seed=15)
    clone = image.parent / "clone.img"
    clone_extents = imagegen.make_clone(image, clone, 0.005, 15)
    changed, extents = make_changed_copy(clone, "changed.img", fraction=0.01, seed=16)
    vault = new_vault(chunk_size=K64)
    first = backup(vault, image, "job1/run1/vm1/vda")
    assert not built  # an empty vault: nothing to put in a file

    second = backup(vault, clone, "job1/run1/vm2/vda")
    third = backup(vault, changed, "job1/run2/vm2/vda", parent="job1/run1/vm2/vda",
                   changed_extents=[(o, n) for o, n in extents])

    assert len(built) == 2 and len(built[0]) == first.stats.chunks_new
    assert len(built[0]._runs) == 16 and all(s._file is None for s in built)  # closed with the backup
    assert 0 < second.stats.bytes_stored <= sum(n for _, n in clone_extents) + K64 * len(clone_extents)
    assert second.stats.chunks_deduplicated >= first.stats.chunks_new - 2 * len(clone_extents)
    assert third.stats.chunks_from_parent > 0  # the parent's chunks were found stored
    assert third.stats.bytes_stored <= sum(n for _, n in extents) + K64 * len(extents)
    for backup_id, source in (("job1/run1/vm2/vda", clone), ("job1/run2/vm2/vda", changed)):
        restore(vault, backup_id, outputs / "out.img")
        assert blake3_file(outputs / "out.img") == blake3_file(source)
        (outputs / "out.img").unlink()


def test_a_cloned_disk_stores_only_its_differences(new_vault: MakeVault, make_image: Callable[..., Path],
                                                   outputs: Path) -> None:
    image = make_image("base.img", 16 * MIB, seed=14)
    clone = image.parent / "clone.img"
    extents = imagegen.make_clone(image, clone, 0.005, 14)
    vault = new_vault(chunk_size=K64)
    first = backup(vault, image, "job1/run1/vm1/vda")

    second = backup(vault, clone, "job1/run1/vm2/vdb")

    changed = sum(length for _, length in extents)
    assert second.stats.bytes_stored <= changed + K64 * len(extents)
    assert second.stats.bytes_stored < first.stats.bytes_stored / 10
    assert second.stats.chunks_deduplicated > 0
    restore(vault, "job1/run1/vm2/vdb", outputs / "clone.img")
    assert blake3_file(outputs / "clone.img") == blake3_file(clone)


# -- qcow2 ----------------------------------------------------------------------------------------


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True)


def test_qcow2_source_backs_up_the_same_content_as_raw(new_vault: MakeVault, make_image: Callable[..., Path],
                                                      outputs: Path) -> None:
    raw = make_image("disk.img", 16 * MIB, seed=15)
    qcow2 = raw.with_suffix(".qcow2")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
    vault = new_vault()

    from_qcow2 = backup(vault, qcow2, "job1/run1/vm1/vda")
    from_raw = backup(vault, raw, "job1/run1/vm1/vdb")

    assert vault.read_manifest(BackupId.parse("job1/run1/vm1/vda")).source_format == "qcow2"
    assert from_qcow2.content_digest == from_raw.content_digest
    assert from_raw.stats.bytes_stored == 0  # same chunks whatever the container
    assert from_qcow2.stats.bytes_read < 16 * MIB  # unallocated clusters are not read
    restore(vault, "job1/run1/vm1/vda", outputs / "disk.img")
    assert blake3_file(outputs / "disk.img") == blake3_file(raw)


def test_restore_to_qcow2(new_vault: MakeVault, make_image: Callable[..., Path], outputs: Path) -> None:
    raw = make_image("disk.img", 16 * MIB, seed=16)
    vault = new_vault()
    backup(vault, raw, "job1/run1/vm1/vda")

    result = restore(vault, "job1/run1/vm1/vda", outputs / "disk.qcow2", fmt="qcow2")

    assert result.format == "qcow2"
    info = qemu_img("info", "--output=json", str(outputs / "disk.qcow2")).stdout
    assert '"format": "qcow2"' in info and f'"virtual-size": {16 * MIB}' in info
    qemu_img("check", str(outputs / "disk.qcow2"))
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", str(raw), str(outputs / "disk.qcow2")).returncode == 0
    assert os.path.getsize(outputs / "disk.qcow2") < 16 * MIB  # holes stay unallocated


def no_process(args: list[str], *_: object, **__: object) -> None:
    raise AssertionError(f"unexpected process: {args}")


@pytest.mark.parametrize("chunk_size", [64 << 10, MIB, 4 * MIB], ids=["64K", "1M", "4M"])
def test_restore_to_qcow2_written_directly(new_vault: MakeVault, tmp_path: Path, outputs: Path,
                                           chunk_size: int) -> None:
    """A new qcow2 image is laid out from the manifest and written without qemu-nbd: data in two of its
    512 MiB L2 tables, a partial last chunk, a zero block inside a chunk, layers on a stored chunk and on
    a hole. qemu-img finds no error or leak, and the guest sees what was backed up."""
    size = 1024 * MIB + 192 * 1024 + 512  # the last chunk is partial at every chunk size
    writes = [(0, os.urandom(3 * K64)), (K64 + 8192, bytes(4096)),  # a zero block inside a chunk
              (300 * MIB, os.urandom(MIB)), (700 * MIB + 4096, os.urandom(5000)), (size - 70000, os.urandom(70000))]
    changed = [(300 * MIB + 4096, 512), (900 * MIB + 8192, 1000)]  # a layer on data, and one on a hole
    full, image = tmp_path / "full.img", tmp_path / "disk.img"
    for path, pieces in ((full, writes), (image, writes + [(o, os.urandom(n)) for o, n in changed])):
        with open(path, "wb") as f:
            f.truncate(size)
            for offset, data in pieces:
                f.seek(offset)
                f.write(data)
    vault = new_vault(chunk_size=chunk_size)
    backup(vault, full, "job1/run1/vm1/vda")
    inc = backup(vault, image, "job1/run2/vm1/vda", parent="job1/run1/vm1/vda", changed_extents=changed)
    assert inc.stats.chunks_delta == 2

    for backup_id, original in (("job1/run1/vm1/vda", full), ("job1/run2/vm1/vda", image)):
        out = outputs / f"{backup_id.split('/')[1]}.qcow2"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(subprocess, "Popen", no_process)  # no qemu-nbd, no qemu-img
            assert restore(vault, backup_id, out, fmt="qcow2").format == "qcow2"
        qemu_img("check", str(out))  # exit 0: no errors, no leaked clusters
        assert qemu_img("compare", "-f", "raw", "-F", "qcow2", str(original), str(out)).returncode == 0
        assert f'"virtual-size": {size}' in qemu_img("info", "--output=json", str(out)).stdout
        assert allocated(out) < 8 * MIB  # holes stay holes, zero blocks too


def test_an_all_zero_disk_restores_to_an_empty_qcow2(new_vault: MakeVault, tmp_path: Path, outputs: Path) -> None:
    image = tmp_path / "zero.img"
    with open(image, "wb") as f:
        f.truncate(64 * MIB)
    vault = new_vault()
    backup(vault, image, "job1/run1/vm1/vda")

    restore(vault, "job1/run1/vm1/vda", outputs / "zero.qcow2", fmt="qcow2")

    qemu_img("check", str(outputs / "zero.qcow2"))
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", str(image), str(outputs / "zero.qcow2")).returncode == 0
    assert '"data": true' not in qemu_img("map", "--output=json", str(outputs / "zero.qcow2")).stdout


def test_restore_never_overwrites_without_being_asked(new_vault: MakeVault, make_image: Callable[..., Path],
                                                     outputs: Path) -> None:
    image = make_image("disk.img", 2 * MIB)
    vault = new_vault()
    backup(vault, image, "job1/run1/vm1/vda")
    out = outputs / "existing.img"
    out.write_bytes(b"precious")

    with pytest.raises(AlreadyExists) as caught:
        restore(vault, "job1/run1/vm1/vda", out)
    assert caught.value.code == "OUTPUT_EXISTS"
    assert out.read_bytes() == b"precious"

    restore_backup(vault, BackupId.parse("job1/run1/vm1/vda"), str(out), overwrite=True)
    assert blake3_file(out) == blake3_file(image)
    assert sorted(p.name for p in outputs.iterdir()) == ["existing.img"]  # no staging file left behind


def test_a_chunk_changed_in_part_reads_only_the_changed_bytes(new_vault: MakeVault, make_image: Callable[..., Path],
                                                              outputs: Path) -> None:
    """Only the changed bytes are read and stored, as layers on the parent's chunks (format.md §8.1)."""
    base = make_image("base.img", 8 * MIB, seed=21)
    changed = base.parent / "changed.img"
    shutil.copyfile(base, changed)
    extents = [(MIB + 4096, 8192), (3 * MIB - 4096, 8192), (5 * MIB, MIB), (7 * MIB + 100, 50)]
    with open(changed, "r+b") as f:
        for off, n in extents:
            f.seek(off)
            f.write(os.urandom(n))
    vault = new_vault()
    backup(vault, base, "job1/run1/vm1/vda")

    inc = backup(vault, changed, "job1/run2/vm1/vda", parent="job1/run1/vm1/vda", changed_extents=extents)

    # 8 KiB, 4 KiB + 4 KiB across a chunk boundary, 50 bytes: layers; the whole chunk 5: read whole.
    assert inc.stats.bytes_read == sum(n for _, n in extents)
    assert (inc.stats.chunks_delta, inc.stats.chunks_patched) == (4, 0)
    assert inc.stats.bytes_stored < MIB + 64 * 1024  # chunk 5 and 20 KiB of layers, not 5 chunks
    restore(vault, "job1/run2/vm1/vda", outputs / "new.img")
    assert blake3_file(outputs / "new.img") == blake3_file(changed)


def test_a_damaged_parent_chunk_is_read_whole_from_the_source_instead(tmp_path: Path, outputs: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(bytes(MIB) + os.urandom(3 * MIB))
    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new())
    backup(vault, base, "job1/run1/vm1/vda")
    ids = vault.read_manifest(BackupId.parse("job1/run1/vm1/vda")).chunk_ids
    i = next(n for n, cid in enumerate(ids) if cid != ZERO_ID)
    loc = vault.load_index().locations[ids[i]]
    pack = tmp_path / "vault" / pack_key(loc.pack_id.hex())
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + 40] ^= 0xFF
    pack.write_bytes(bytes(raw))
    changed = base.parent / "changed.img"
    shutil.copyfile(base, changed)
    change = os.urandom(MIB * 3 // 4)  # most of the chunk: rebuilt from the parent's copy, not layered
    with open(changed, "r+b") as f:
        f.seek(i * MIB + 10)
        f.write(change)

    inc = backup(vault, changed, "job1/run2/vm1/vda", parent="job1/run1/vm1/vda",
                 changed_extents=[(i * MIB + 10, len(change))])

    assert inc.stats.chunks_patched == 0 and inc.stats.bytes_read == MIB
    restore(vault, "job1/run2/vm1/vda", outputs / "new.img")
    assert blake3_file(outputs / "new.img") == blake3_file(changed)


def test_restore_leaves_holes_inside_chunks_sparse(new_vault: MakeVault, tmp_path: Path, outputs: Path) -> None:
    """A chunk half data, half hole restores identical, with the hole not written (a fresh image is zero)."""
    image = tmp_path / "holey.img"
    data = os.urandom(MIB // 2)
    with open(image, "wb") as f:
        f.truncate(4 * MIB)
        f.seek(MIB)
        f.write(data)  # chunk 1: data, then a hole
        f.seek(2 * MIB + 64 * 1024)
        f.write(data[:8192])  # chunk 2: hole, 8 KiB of data, hole
    vault = new_vault()
    backup(vault, image, "job1/run1/vm1/vda")
    restore(vault, "job1/run1/vm1/vda", outputs / "holey.img")
    assert blake3_file(outputs / "holey.img") == blake3_file(image)
    assert allocated(outputs / "holey.img") <= allocated(image) + 64 * 1024


def test_backup_of_a_chunk_of_allocated_zeros_stores_nothing(new_vault: MakeVault, tmp_path: Path) -> None:
    """Zero chunks are recognised by their id, also when the source holds them as data, not holes."""
    image = tmp_path / "zeros.img"
    image.write_bytes(bytes(2 * MIB) + os.urandom(1536))  # two allocated zero chunks and a short tail
    vault = new_vault(encrypted=True)
    result = backup(vault, image, "job1/run1/vm1/vda")
    assert result.stats.chunks_zero == 2 and result.stats.chunks_new == 1
    manifest = vault.read_manifest(BackupId.parse("job1/run1/vm1/vda"))
    assert manifest.chunk_ids[:2] == [ZERO_ID, ZERO_ID]


def test_a_large_disk_restores_a_window_of_chunks_at_a_time(new_vault: MakeVault, tmp_path: Path, outputs: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """What a restore plans per chunk is held for a window at a time (here 3 chunks): a chunk repeated in
    several windows, zero runs across window edges and a last short chunk all come back exactly."""
    monkeypatch.setattr(restore_module, "RESTORE_WINDOW", 3)
    planned: list[int] = []
    real_window_work = restore_module.window_work
    monkeypatch.setattr(restore_module, "window_work", lambda m, locs, start, end: (
        planned.append(start), real_window_work(m, locs, start, end))[1])
    same = os.urandom(K64)
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        for block in (same, os.urandom(K64), bytes(K64), bytes(K64), bytes(K64), same, os.urandom(K64), same):
            f.write(block)
        f.write(os.urandom(4096))  # a short last chunk
    vault = new_vault(chunk_size=K64)
    backup(vault, image, "job1/run1/vm1/vda")
    restored = restore(vault, "job1/run1/vm1/vda", outputs / "vda.img")
    assert blake3_file(outputs / "vda.img") == blake3_file(image)
    assert planned == [0, 3, 6]
    assert restored.chunks_verified == 4  # the repeated chunk is one blob, however many windows read it


def test_a_larger_disk_loads_the_locations_of_a_window_at_a_time(new_vault: MakeVault, tmp_path: Path,
                                                                 outputs: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """Locations are loaded for about INDEX_WINDOW blobs at a time (4 here), so a restore's memory follows
    neither the vault nor the disk: an incremental with layers, a chunk repeated across windows, zero
    chunks that need nothing, all exact."""
    monkeypatch.setattr(restore_module, "INDEX_WINDOW", 4)
    monkeypatch.setattr(restore_module, "RESTORE_WINDOW", 3)
    loads: list[int] = []
    real_load = Vault.load_index
    monkeypatch.setattr(Vault, "load_index", lambda self, **kw: (
        loads.append(len(kw.get("only") or ())), real_load(self, **kw))[1])
    same = os.urandom(K64)
    blocks = [same, os.urandom(K64), bytes(K64), os.urandom(K64), same, os.urandom(K64), os.urandom(K64),
              bytes(K64), os.urandom(K64), same, *[bytes(K64)] * 20]
    image = tmp_path / "disk.img"
    image.write_bytes(b"".join(blocks))
    vault = new_vault(chunk_size=K64)
    backup(vault, image, "job1/run1/vm1/vda")
    changed = [(5 * K64 + 4096, 512), (9 * K64, 100)]  # small changes: stored as layers
    with open(image, "r+b") as f:
        for offset, n in changed:
            f.seek(offset)
            f.write(os.urandom(n))
    inc = backup(vault, image, "job1/run2/vm1/vda", parent="job1/run1/vm1/vda", changed_extents=changed)
    assert inc.stats.chunks_delta == 2
    manifest = vault.read_manifest(BackupId.parse("job1/run2/vm1/vda"))
    loads.clear()

    restored = restore(vault, "job1/run2/vm1/vda", outputs / "vda.img")

    assert blake3_file(outputs / "vda.img") == blake3_file(image)
    # Blobs counted with repeats: chunks 0-4 (same, 1, 3, same), 5-8 (5's base and layer, 6, 8), then 9 (same
    # and its layer) with the 20 zero chunks after it, which need nothing.
    assert restore_module.index_windows(manifest) == [(0, 5), (5, 9), (9, 30)]
    assert loads == [3, 4, 2]  # each window's distinct blobs only
    assert restored.chunks_verified == restore_module.blobs_to_verify(manifest) == 9


def test_a_sparse_disk_of_any_size_is_one_index_window() -> None:
    ids = ChunkIds.zeros(1 << 20)
    for i in (3, 500_000, 1_048_000):
        ids[i] = os.urandom(32)
    m = Manifest(id=BackupId.parse("j/r/vm/vda"), virtual_size=1 << 40, chunk_size=MIB, chunk_ids=ids,
                 source_format="raw", created="2026-11-26T00:00:00Z")
    assert restore_module.index_windows(m) == [(0, 1 << 20)]


def test_a_chunk_missing_in_a_later_window_leaves_no_output(new_vault: MakeVault, tmp_path: Path, outputs: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Found only when its window comes (two chunks here), after others were written: nothing is left."""
    monkeypatch.setattr(restore_module, "INDEX_WINDOW", 2)
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(6 * K64))
    vault = new_vault(chunk_size=K64, pack_size=2 * K64)
    backup(vault, image, "job1/run1/vm1/vda")
    last = vault.read_manifest(BackupId.parse("job1/run1/vm1/vda")).chunk_ids[5]
    loc = vault.load_index().get(last)
    assert loc is not None
    vault.backend.delete(pack_key(loc.pack_id.hex()))

    with pytest.raises(ChunkMissing):
        restore(vault, "job1/run1/vm1/vda", outputs / "vda.img")
    assert list(outputs.iterdir()) == []


def test_the_chunks_a_backup_reads_are_spans_not_a_list_of_every_chunk() -> None:
    """A dense 16 TiB disk is one span: 16 bytes, not 8 bytes for each of its 16 million chunks."""
    chunks = chunks_touching([(5 * MIB, 10), (0, 2 * MIB + 1), (7 * MIB - 1, 2), (100 * MIB, 1)], MIB, 8 * MIB)
    assert list(chunks) == [0, 1, 2, 5, 6, 7] and list(chunks) == [0, 1, 2, 5, 6, 7]  # iterable again
    assert len(chunks) == 6 and 2 in chunks and 3 not in chunks and 7 in chunks and 8 not in chunks
    whole = chunks_touching([(0, 16 << 40)], MIB, 16 << 40)
    assert len(whole) == 16 << 20 and (16 << 20) - 1 in whole and whole.spans == 1
