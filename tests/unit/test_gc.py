"""Garbage collection (format.md §11): what `raksha vault gc` frees, what it must never touch,
and how it behaves next to running backups and when it is killed half way.

Vaults are real directories (LocalBackend) with 64 KiB chunks and small packs, so a 16 MiB
image spreads over dozens of packs. Packs are aged with os.utime to get past the grace period.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import blake3
import pytest

from conftest import K64, chunk_image, index_objects, random_chunk, sets_on_disk
from raksha.domain.errors import VaultCorrupt, VaultLocked
from raksha.vault.backends.base import ObjectInfo
from raksha.vault.backends.local import LocalBackend
from raksha.vault.engine.backup import BackupResult, backup_disk
from raksha.vault.engine.packer import Packer
from raksha.vault.engine.restore import restore_backup
from raksha.vault.format.config import VaultConfig
from raksha.vault.format.constants import ZERO_ID
from raksha.vault.format.index import decode_index
from raksha.vault.format.keys import KdfParams, Secret
from raksha.vault.format.naming import BackupId
from raksha.vault.locks import LockKind
from raksha.vault.operations import gc as gc_module
from raksha.vault.operations.gc import GcReport, collect_garbage
from raksha.vault.operations.verify import verify_vault
from raksha.vault.repository import Vault
from raksha.vault.sources.raw import RawSource

MIB = 1 << 20
HOUR = 3600.0


def _load_imagegen() -> ModuleType:
    name = "bench_imagegen"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "bench" / "imagegen.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules[name]


imagegen = _load_imagegen()


# -- helpers -------------------------------------------------------------------------------------


def make_vault(root: Path, *, encrypted: bool = False, pack_size: int = 8 * K64) -> Vault:
    """A vault directory with 64 KiB chunks and (by default) 512 KiB packs."""
    config = VaultConfig.new(chunk_size=K64, pack_size=pack_size, encrypted=encrypted)
    secret = Secret(passphrase=b"gc test") if encrypted else None
    return Vault.init(LocalBackend(root, create=True), config, secret, KdfParams(memory_kib=8192))


def image(path: Path, size: int = 16 * MIB, seed: int = 1) -> Path:
    imagegen.generate_image(path, size, seed)
    return path


def backup(vault: Vault, img: Path, bid: str, **kwargs: Any) -> BackupResult:
    source = RawSource(str(img))
    try:
        return backup_disk(vault, source, BackupId.parse(bid), **kwargs)
    finally:
        source.close()


def digest(path: Path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()


def assert_restores(vault: Vault, bid: str, img: Path, tmp_path: Path) -> None:
    out = tmp_path / f"restored-{os.urandom(4).hex()}.img"
    restore_backup(vault, BackupId.parse(bid), str(out), threads=2)
    assert digest(out) == digest(img), f"{bid} does not restore bit-exact"
    out.unlink()


def assert_verifies(vault: Vault) -> None:
    report = verify_vault(vault, threads=2)
    assert report.ok, report.summary()


def root(vault: Vault) -> Path:
    return Path(vault.backend.url)


def pack_ids(vault: Vault) -> set[str]:
    return {pid for pid, _size, _mtime in vault.iter_packs()}


def index_ids(vault: Vault) -> set[str]:
    return {info.key.removeprefix("index/") for info in vault.backend.list("index/")}


def packs_of(vault: Vault, bid: str) -> set[str]:
    """The packs holding the chunks of backup ``bid``, as the index says."""
    index = vault.load_index()
    manifest = vault.read_manifest(BackupId.parse(bid))
    return {index.locations[cid].pack_id.hex() for cid in manifest.chunk_ids if cid != ZERO_ID}


def pack_bytes(vault: Vault, pids: set[str]) -> int:
    return sum(size for pid, size, _mtime in vault.iter_packs() if pid in pids)


def age_packs(vault: Vault, seconds: float = 2 * HOUR) -> None:
    """Pretend every pack was written ``seconds`` ago, past the default one-hour grace period."""
    then = time.time() - seconds
    for info in vault.backend.list("data/"):
        os.utime(root(vault) / info.key, (then, then))


def snapshot(vault: Vault) -> dict[str, int]:
    """Every object of the vault (but locks) with its size."""
    return {info.key: info.size for info in vault.backend.list() if not info.key.startswith("locks/")}


def assert_index_points_at_existing_packs(vault: Vault) -> None:
    """Every entry of every index that readers use names a pack that exists."""
    existing = pack_ids(vault)
    files = index_objects(vault)
    superseded = {s.hex() for f in files.values() for s in f.supersedes}
    for index_id, f in files.items():
        if index_id in superseded:
            continue
        dangling = {loc.pack_id.hex() for loc in f.entries.values()} - existing
        assert not dangling, f"index {index_id} names deleted packs {sorted(dangling)[:3]}"


@pytest.fixture
def three_backups(tmp_path: Path) -> Iterator[tuple[Vault, dict[str, Path]]]:
    """Backups ``a`` (base image), ``b`` (a 20%-changed copy of it, sharing most chunks) and
    ``c`` (an unrelated image), all made an hour and more ago."""
    images = tmp_path / "images"
    images.mkdir()
    base = image(images / "base.img", seed=1)
    changed = images / "changed.img"
    imagegen.make_changed_copy(base, changed, 0.2, 2)
    other = image(images / "other.img", seed=3)
    vault = make_vault(tmp_path / "vault")
    imgs = {"j/r1/vm1/vda": base, "j/r2/vm1/vda": changed, "j/r1/vm2/vda": other}
    for bid, img in imgs.items():
        backup(vault, img, bid, threads=1)  # one reader, one worker: the same packs every run
    age_packs(vault)
    yield vault, imgs


A, B, C = "j/r1/vm1/vda", "j/r2/vm1/vda", "j/r1/vm2/vda"


# -- what gc frees ---------------------------------------------------------------------------------


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_gc_after_delete_frees_exactly_the_packs_only_that_backup_used(tmp_path: Path, encrypted: bool) -> None:
    base, other = image(tmp_path / "base.img", seed=1), image(tmp_path / "other.img", seed=3)
    vault = make_vault(tmp_path / "vault", encrypted=encrypted)
    backup(vault, base, A)
    backup(vault, other, C)
    only_c = packs_of(vault, C) - packs_of(vault, A)
    assert len(only_c) > 5
    freed = pack_bytes(vault, only_c)
    age_packs(vault)

    vault.delete_backup(BackupId.parse(C))
    report = collect_garbage(vault, grace=0)

    assert report.packs_deleted == len(only_c)
    assert report.packs_repacked == 0
    assert report.waited_seconds == 0  # no backup was running
    assert report.bytes_freed == freed
    assert pack_ids(vault) == packs_of(vault, A)  # c's packs are gone, a's all still there
    assert_restores(vault, A, base, tmp_path)
    assert_verifies(vault)
    assert not list(vault.backend.list("locks/")), "gc leaves neither its lock nor its condemned list"


def test_gc_with_nothing_to_free_deletes_nothing(three_backups: tuple[Vault, dict[str, Path]]) -> None:
    vault, _imgs = three_backups
    before = pack_ids(vault)
    report = collect_garbage(vault, grace=0)
    assert (report.packs_deleted, report.packs_repacked, report.orphan_packs_deleted) == (0, 0, 0)
    assert report.bytes_freed == 0
    assert pack_ids(vault) == before


def test_chunks_two_index_objects_both_list_count_once(three_backups: tuple[Vault, dict[str, Path]],
                                                        tmp_path: Path) -> None:
    # Counted twice, every pack would look half garbage and be rewritten for nothing.
    vault, imgs = three_backups
    entries = dict(vault.load_index().locations.items())
    vault.write_index(entries)  # a second live object naming every entry again
    before = pack_ids(vault)

    report = collect_garbage(vault, grace=0)

    assert (report.packs_deleted, report.packs_repacked, report.bytes_freed) == (0, 0, 0)
    assert pack_ids(vault) == before
    live = [f for f in index_objects(vault).values()]
    assert len(live) == 1 and sorted(live[0].entries) == sorted(entries)  # consolidated, each chunk once
    assert_restores(vault, B, imgs[B], tmp_path)


def test_packs_younger_than_the_grace_period_are_never_deleted(tmp_path: Path) -> None:
    base, other = image(tmp_path / "base.img", seed=1), image(tmp_path / "other.img", seed=3)
    vault = make_vault(tmp_path / "vault")
    backup(vault, base, A)
    backup(vault, other, C)  # written just now
    vault.delete_backup(BackupId.parse(C))
    before = pack_ids(vault)

    report = collect_garbage(vault)  # default grace: one hour
    assert pack_ids(vault) == before
    assert report.young_packs_kept == len(before) == report.packs_total
    assert report.packs_deleted == report.bytes_freed == 0

    # Half an hour old: still inside the grace period.
    age_packs(vault, HOUR / 2)
    collect_garbage(vault)
    assert pack_ids(vault) == before

    # Two hours old: c's packs go.
    age_packs(vault, 2 * HOUR)
    report = collect_garbage(vault)
    assert report.packs_deleted > 0 and report.young_packs_kept == 0
    assert pack_ids(vault) == packs_of(vault, A)
    assert_restores(vault, A, base, tmp_path)


def test_chunks_shared_with_a_remaining_backup_survive(three_backups: tuple[Vault, dict[str, Path]],
                                                      tmp_path: Path) -> None:
    vault, imgs = three_backups
    shared = packs_of(vault, A) & packs_of(vault, B)
    assert shared, "the changed copy shares packs with its base"
    vault.delete_backup(BackupId.parse(A))

    report = collect_garbage(vault, grace=0)

    assert report.packs_deleted + report.packs_repacked > 0 and report.bytes_freed > 0
    assert_index_points_at_existing_packs(vault)
    for bid in (B, C):
        assert_restores(vault, bid, imgs[bid], tmp_path)
    assert_verifies(vault)


@pytest.mark.parametrize(("garbage", "repacked"), [(3, True), (2, False)], ids=["30%-garbage", "20%-garbage"])
def test_a_pack_with_garbage_above_the_threshold_is_repacked(tmp_path: Path, garbage: int, repacked: bool) -> None:
    # One pack of ten incompressible chunks (the pack closes at the tenth). Backup a uses all ten,
    # backup b the first 10 - garbage of them; once a is deleted that share of the pack is garbage.
    vault = make_vault(tmp_path / "vault", pack_size=10 * K64)
    chunks = [random_chunk(i) for i in range(10)]
    img_a = chunk_image(tmp_path / "a.img", list(chunks))
    img_b = chunk_image(tmp_path / "b.img", chunks[: 10 - garbage] + [None] * garbage)
    backup(vault, img_a, A, threads=1)
    backup(vault, img_b, B, threads=1)
    (old_pack,) = pack_ids(vault)
    age_packs(vault)
    vault.delete_backup(BackupId.parse(A))

    report = collect_garbage(vault, grace=0, repack_threshold=0.25)

    if repacked:
        assert report.packs_repacked == 1 and report.packs_deleted == 0
        (new_pack,) = pack_ids(vault)
        assert new_pack != old_pack
        assert packs_of(vault, B) == {new_pack}
        assert garbage * K64 <= report.bytes_freed < (garbage + 1) * K64
    else:
        assert report.packs_repacked == 0 and report.bytes_freed == 0
        assert pack_ids(vault) == {old_pack}
    assert_restores(vault, B, img_b, tmp_path)
    assert_verifies(vault)


def test_a_small_pack_without_garbage_is_left_alone(tmp_path: Path) -> None:
    # A chunk that compresses to a few bytes makes a pack whose header outweighs its blob; that
    # overhead is not garbage. (Counting it as garbage made gc "repack" the pack into identical
    # bytes, the same pack id, and then delete it: the chunk was lost.)
    vault = make_vault(tmp_path / "vault", pack_size=K64)
    img = chunk_image(tmp_path / "tiny.img", [b"\x01" * 16 + bytes(K64 - 16)])
    backup(vault, img, A)
    before = pack_ids(vault)
    age_packs(vault)

    report = collect_garbage(vault, grace=0)

    assert report.packs_repacked == report.packs_deleted == 0
    assert pack_ids(vault) == before
    assert_restores(vault, A, img, tmp_path)
    assert_verifies(vault)


def test_dry_run_reports_but_deletes_nothing(three_backups: tuple[Vault, dict[str, Path]]) -> None:
    vault, _imgs = three_backups
    vault.delete_backup(BackupId.parse(C))
    before = snapshot(vault)

    report = collect_garbage(vault, grace=0, dry_run=True)

    assert report.dry_run
    assert report.packs_deleted > 0 and report.bytes_freed > 0
    assert "would free" in report.summary()
    assert snapshot(vault) == before
    assert not list(vault.backend.list("locks/"))
    # The real run frees what the dry run announced.
    real = collect_garbage(vault, grace=0)
    assert (real.packs_deleted, real.bytes_freed) == (report.packs_deleted, report.bytes_freed)


def test_report_is_json_serialisable(three_backups: tuple[Vault, dict[str, Path]]) -> None:
    vault, _imgs = three_backups
    vault.delete_backup(BackupId.parse(C))
    report = collect_garbage(vault, grace=0)
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["packs_deleted"] == report.packs_deleted and doc["dry_run"] is False
    assert "freed" in report.summary()


# -- the index -------------------------------------------------------------------------------------


def test_gc_writes_the_index_in_objects_of_bounded_size(three_backups: tuple[Vault, dict[str, Path]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader holds a whole index object while decoding it: gc's consolidated index comes in pieces,
    the last superseding what it replaces."""
    vault, _imgs = three_backups
    monkeypatch.setattr(gc_module, "MERGE_ENTRIES", 10)
    old_ids = index_ids(vault)
    before = vault.load_index().locations

    collect_garbage(vault, grace=0)

    objects = [decode_index(vault.backend.get(f"index/{i}"), vault.crypto, what=i) for i in index_ids(vault)]
    assert len(objects) == -(-len(before) // 10) and all(len(o) <= 10 for o in objects)
    assert [{s.hex() for s in o.supersedes} for o in objects if o.supersedes] == [old_ids]
    assert vault.load_index().locations == before


def test_gc_consolidates_the_index_into_one_object(three_backups: tuple[Vault, dict[str, Path]],
                                                  tmp_path: Path) -> None:
    vault, imgs = three_backups
    old_ids = index_ids(vault)
    assert len(old_ids) == 3  # one per backup: each merges the objects that indexed its packs as it went
    before = vault.load_index().locations

    report = collect_garbage(vault, grace=0)

    (new_id,) = index_ids(vault)
    assert report.indexes_consolidated == len(old_ids)
    assert vault.load_index().locations == before  # nothing was garbage: every location is unchanged
    # The new index supersedes the old ones, so a reader that still sees some of them ignores them.
    new = decode_index(vault.backend.get(f"index/{new_id}"), vault.crypto, what=new_id)
    assert {s.hex() for s in new.supersedes} == old_ids

    # Again: the consolidated index is replaced by one superseding it, with the same content.
    collect_garbage(vault, grace=0)
    assert index_ids(vault) == {new_id}, "an index with nothing to consolidate is left as it is"
    vault.delete_backup(BackupId.parse(C))
    collect_garbage(vault, grace=0)
    (third,) = index_ids(vault)
    assert third != new_id
    assert_index_points_at_existing_packs(vault)
    for bid in (A, B):
        assert_restores(vault, bid, imgs[bid], tmp_path)


def test_data_backed_up_again_after_gc_deleted_it_restores(tmp_path: Path) -> None:
    # Same image, single-threaded: the second backup writes the same blobs in the same order as the
    # packs gc deleted. Packs and indexes carry a nonce, so none of the new objects can take an old
    # name and be confused with what gc deleted or superseded.
    img = image(tmp_path / "base.img", 8 * MIB)
    vault = make_vault(tmp_path / "vault")
    backup(vault, img, A, threads=1)
    first_packs = pack_ids(vault)
    age_packs(vault)
    vault.delete_backup(BackupId.parse(A))
    assert collect_garbage(vault, grace=0).packs_deleted == len(first_packs)

    backup(vault, img, B, threads=1)

    assert pack_ids(vault).isdisjoint(first_packs)
    assert_restores(vault, B, img, tmp_path)
    assert_verifies(vault)


def test_superseded_indexes_left_by_a_killed_gc_are_ignored_and_removed(
        three_backups: tuple[Vault, dict[str, Path]], tmp_path: Path) -> None:
    vault, imgs = three_backups
    old = index_ids(vault)
    locations = vault.load_index().locations
    # What a gc killed right after writing its consolidated index leaves: both generations.
    vault.write_index(dict(locations), [bytes.fromhex(i) for i in old])
    assert vault.load_index().locations == locations
    assert len(vault.load_index().index_ids) == 1

    collect_garbage(vault, grace=0)

    assert len(index_ids(vault)) == 1
    assert_restores(vault, A, imgs[A], tmp_path)


# -- orphans ---------------------------------------------------------------------------------------


def _write_orphan_pack(vault: Vault, monkeypatch: pytest.MonkeyPatch, chunk: bytes) -> str:
    """Store a pack as a backup killed between storing it and writing its index would leave it."""

    class Killed(Exception):
        pass

    def killed(*_args: object, **_kwargs: object) -> str:
        raise Killed

    import zstandard

    from raksha.vault.format.blob import encode_blob

    cid = vault.crypto.chunk_id(chunk)
    packer = Packer(vault)
    packer.add(cid, encode_blob(chunk, cid, vault.crypto, zstandard.ZstdCompressor()), len(chunk))
    before = pack_ids(vault)
    with monkeypatch.context() as m:
        m.setattr(vault, "write_index", killed)
        with pytest.raises(Killed):
            packer.flush()
    (orphan,) = pack_ids(vault) - before
    return orphan


def test_orphan_pack_of_a_killed_backup_is_deleted_once_past_the_grace_period(
        three_backups: tuple[Vault, dict[str, Path]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    vault, imgs = three_backups
    orphan = _write_orphan_pack(vault, monkeypatch, random_chunk(99))

    report = collect_garbage(vault)  # the orphan is fresh: it may be an in-flight backup's
    assert orphan in pack_ids(vault)
    assert report.young_packs_kept == 1 and report.orphan_packs_deleted == 0

    age_packs(vault)
    report = collect_garbage(vault)
    assert orphan not in pack_ids(vault)
    assert report.orphan_packs_deleted == 1 and report.packs_deleted == 0
    for bid, img in imgs.items():
        assert_restores(vault, bid, img, tmp_path)


def test_packs_of_an_interrupted_backup_are_garbage(three_backups: tuple[Vault, dict[str, Path]],
                                                    tmp_path: Path) -> None:
    vault, imgs = three_backups
    new_img = image(tmp_path / "new.img", seed=7)

    class Interrupted(Exception):
        pass

    class DiesHalfWay(RawSource):
        read = 0

        def readinto(self, offset: int, buf: memoryview) -> None:  # what the engine reads raw images with
            DiesHalfWay.read += len(buf)
            if DiesHalfWay.read > 8 * MIB:  # half of the image
                raise Interrupted
            super().readinto(offset, buf)

    before = pack_ids(vault)
    source = DiesHalfWay(str(new_img))
    with pytest.raises(Interrupted):
        backup_disk(vault, source, BackupId.parse("j/r9/vm9/vda"), threads=1)
    source.close()
    left = pack_ids(vault) - before
    assert left, "the interrupted backup stored some packs (and their index) but no manifest"
    age_packs(vault)

    report = collect_garbage(vault)

    assert report.packs_deleted == len(left)
    assert pack_ids(vault) == before
    assert_restores(vault, A, imgs[A], tmp_path)
    assert_verifies(vault)


def test_a_pack_whose_index_was_lost_is_reindexed_not_deleted(tmp_path: Path) -> None:
    base = image(tmp_path / "base.img")
    vault = make_vault(tmp_path / "vault")
    backup(vault, base, A)
    packs = pack_ids(vault)
    for index_id in index_ids(vault):
        vault.backend.delete(f"index/{index_id}")
    age_packs(vault)

    report = collect_garbage(vault, grace=0)

    assert report.packs_reindexed == len(packs)
    assert report.packs_deleted == report.orphan_packs_deleted == 0
    assert pack_ids(vault) == packs
    assert len(index_ids(vault)) == 1
    assert_restores(vault, A, base, tmp_path)
    assert_verifies(vault)


def test_a_reindexed_pack_whose_chunks_live_elsewhere_leaves_no_dangling_index(tmp_path: Path) -> None:
    # Backup a's pack P loses its index. Backup b, not seeing a's chunks, stores five of them
    # again next to new data. a is deleted. gc finds P, re-indexes it (it holds live chunks) but
    # then deletes it, as b's packs hold those chunks too: nothing may point at P afterwards.
    vault = make_vault(tmp_path / "vault", pack_size=10 * K64)
    chunks = [random_chunk(i) for i in range(20)]
    img_a = chunk_image(tmp_path / "a.img", chunks[:10])
    img_b = chunk_image(tmp_path / "b.img", chunks[:5] + chunks[10:20])
    backup(vault, img_a, A, threads=1)
    (pack_a,) = pack_ids(vault)
    for index_id in index_ids(vault):
        vault.backend.delete(f"index/{index_id}")
    backup(vault, img_b, B, threads=1)
    vault.delete_backup(BackupId.parse(A))
    age_packs(vault)

    report = collect_garbage(vault, grace=0)

    assert report.packs_reindexed == 1
    assert pack_a not in pack_ids(vault)
    assert_index_points_at_existing_packs(vault)
    assert_restores(vault, B, img_b, tmp_path)
    assert_verifies(vault)


def test_condemned_lists_left_by_a_killed_gc_are_removed(three_backups: tuple[Vault, dict[str, Path]]) -> None:
    vault, _imgs = three_backups
    stale = f"locks/{os.urandom(16).hex()}.condemned"  # its gc (and lock) are long gone
    vault.backend.put(stale, bytes(32))
    collect_garbage(vault, grace=0)
    assert not list(vault.backend.list("locks/"))


# -- refusing, failing, being killed ---------------------------------------------------------------


def test_gc_refuses_when_a_manifest_is_unreadable(three_backups: tuple[Vault, dict[str, Path]]) -> None:
    vault, _imgs = three_backups
    vault.delete_backup(BackupId.parse(C))  # there is garbage to free
    key = BackupId.parse(B).backup_key
    data = bytearray(vault.backend.get(key))
    data[len(data) // 2] ^= 0xFF
    vault.backend.put(key, bytes(data), overwrite=True)
    before = snapshot(vault)

    with pytest.raises(VaultCorrupt) as err:
        collect_garbage(vault, grace=0)

    assert err.value.details["backup"] == B
    assert snapshot(vault) == before  # b's chunks would have looked free: nothing is deleted
    assert not list(vault.backend.list("locks/"))


def test_gc_refuses_when_an_index_is_unreadable(three_backups: tuple[Vault, dict[str, Path]]) -> None:
    vault, _imgs = three_backups
    vault.delete_backup(BackupId.parse(C))
    key = f"index/{sorted(index_ids(vault))[0]}"
    vault.backend.put(key, b"RKIX\x01\x00garbage", overwrite=True)
    before = snapshot(vault)
    with pytest.raises(VaultCorrupt):
        collect_garbage(vault, grace=0)
    assert snapshot(vault) == before  # the packs it named would have looked orphaned


class Crash(Exception):
    """Stands for the process being killed at this point."""


class Seam:
    """Where to crash: the ``nth`` backend ``verb`` call on a key under ``prefix``. For index puts,
    ``superseding`` picks the consolidated index (it supersedes the old ones) or the indexes
    written without a supersedes list (the repack's)."""

    def __init__(self, verb: str, prefix: str, nth: int = 1, superseding: bool | None = None) -> None:
        self.verb, self.prefix, self.nth, self.superseding = verb, prefix, nth, superseding
        self.calls = 0

    def hit(self, vault: Vault, key: str, args: tuple[Any, ...]) -> bool:
        if not key.startswith(self.prefix):
            return False
        if self.superseding is not None:
            supersedes = decode_index(args[0], vault.crypto, what=key).supersedes
            if bool(supersedes) != self.superseding:
                return False
        self.calls += 1
        return self.calls == self.nth


def crash_at(vault: Vault, monkeypatch: pytest.MonkeyPatch, seam: Seam) -> None:
    real = getattr(vault.backend, seam.verb)

    def wrapper(key: str, *args: Any, **kwargs: Any) -> Any:
        if seam.hit(vault, key, args):
            raise Crash(f"killed at {seam.verb} {key}")
        return real(key, *args, **kwargs)

    monkeypatch.setattr(vault.backend, seam.verb, wrapper)


SEAMS = {
    "repack": Seam("put_file", "data/", 2),
    "repack-index": Seam("put", "index/", 1, superseding=False),
    "consolidated-index": Seam("put", "index/", 1, superseding=True),
    "first-index-delete": Seam("delete", "index/", 1),  # right after the consolidated index is durable
    "index-deletes": Seam("delete", "index/", 5),  # half way through deleting the old indexes
    "first-pack-delete": Seam("delete", "data/", 1),
    "pack-deletes": Seam("delete", "data/", 7),  # half way through deleting packs
}


@pytest.mark.parametrize("seam", SEAMS, ids=list(SEAMS))
def test_gc_killed_at_any_step_leaves_a_readable_vault(three_backups: tuple[Vault, dict[str, Path]],
                                                       monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       seam: str) -> None:
    vault, imgs = three_backups
    vault.delete_backup(BackupId.parse(A))  # most of a's packs are shared with b: repacked
    vault.delete_backup(BackupId.parse(C))  # c's packs are deleted
    with monkeypatch.context() as m:
        crash_at(vault, m, SEAMS[seam])
        with pytest.raises(Crash):
            collect_garbage(vault, grace=0)

    assert_restores(vault, B, imgs[B], tmp_path)
    assert_verifies(vault)

    report = collect_garbage(vault, grace=0)  # the next gc finishes the job
    assert len(index_ids(vault)) == 1
    assert_index_points_at_existing_packs(vault)
    assert pack_ids(vault) == packs_of(vault, B), f"left garbage: {report.summary()}"
    assert_restores(vault, B, imgs[B], tmp_path)
    assert_verifies(vault)


def test_a_second_gc_is_refused_while_one_runs(three_backups: tuple[Vault, dict[str, Path]]) -> None:
    vault, _imgs = three_backups
    vault.delete_backup(BackupId.parse(C))
    # gc #1 waits for a backup's shared lock, holding its maintenance lock meanwhile.
    shared = vault.locks.acquire(LockKind.SHARED, "backup j/r5/vm5/vda")
    first: list[GcReport | BaseException] = []
    thread = threading.Thread(target=lambda: first.append(collect_garbage(vault, grace=0, poll=0.02)))
    thread.start()
    try:
        wait_for(lambda: any(i.key.endswith(".condemned") for i in vault.backend.list("locks/")))
        with pytest.raises(VaultLocked) as err:
            collect_garbage(vault, grace=0)
        assert err.value.details["operation"] == "gc"
    finally:
        shared.release()
        thread.join(30)
    assert isinstance(first[0], GcReport) and first[0].packs_deleted > 0


# -- running next to backups -----------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class SlowSource(RawSource):
    """A raw image whose reads take ``delay`` seconds each and can be held at ``gate``."""

    def __init__(self, path: Path, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        super().__init__(str(path))
        self.delay = delay
        self.gate = gate
        self.reading = threading.Event()  # set at the first read: the backup has read index and condemned lists

    def readinto(self, offset: int, buf: memoryview) -> None:  # what the engine reads raw images with
        self.reading.set()
        if self.gate is not None:
            assert self.gate.wait(60)
        time.sleep(self.delay)
        super().readinto(offset, buf)


def run_in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(target())
        except BaseException as exc:  # handed to the test
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def result(thread: threading.Thread, out: list[Any]) -> Any:
    thread.join(60)
    assert not thread.is_alive()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


@pytest.fixture
def deleted_base(tmp_path: Path) -> tuple[Vault, Path, Path]:
    """Backup a of an 8 MiB image, made long ago and then deleted: its chunks are all garbage.
    Backup c of another image stays. Single-threaded backups make packs byte-for-byte
    reproducible, so backing the base image up again writes packs identical to a's."""
    base, other = image(tmp_path / "base.img", 8 * MIB, seed=1), image(tmp_path / "other.img", 8 * MIB, seed=3)
    vault = make_vault(tmp_path / "vault")
    backup(vault, base, A, threads=1)
    backup(vault, other, C, threads=1)
    age_packs(vault)
    vault.delete_backup(BackupId.parse(A))
    return vault, base, other


def test_gc_waits_for_a_running_backup_that_reuses_garbage_chunks(deleted_base: tuple[Vault, Path, Path],
                                                                  tmp_path: Path) -> None:
    vault, base, other = deleted_base
    source = SlowSource(base, delay=0.01)
    thread, out = run_in_thread(lambda: backup_disk(vault, source, BackupId.parse(B), threads=2))
    assert source.reading.wait(30)  # the backup has read the index: a's chunks look stored to it

    report = collect_garbage(vault, grace=0, poll=0.02)

    res: BackupResult = result(thread, out)
    source.close()
    assert res.stats.chunks_new == 0 and res.stats.chunks_deduplicated > 0  # it reused a's garbage
    assert report.waited_seconds > 0
    assert_restores(vault, B, base, tmp_path)
    assert_restores(vault, C, other, tmp_path)
    assert_verifies(vault)
    assert_index_points_at_existing_packs(vault)


@pytest.mark.parametrize("on_disk", [False, True], ids=["in-memory", "on-disk"])
def test_a_backup_started_after_the_condemned_list_stores_condemned_chunks_again(
        deleted_base: tuple[Vault, Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, on_disk: bool) -> None:
    vault, base, other = deleted_base
    finished = sets_on_disk(monkeypatch) if on_disk else []  # the backup reads the condemned list into a file
    real_wait = gc_module._Gc._wait_for_backups
    started: list[tuple[threading.Thread, list[Any]]] = []

    def backup_then_wait(self: gc_module._Gc) -> None:
        condemned = vault.condemned_chunks()
        assert condemned, "the condemned list is published"
        assert on_disk == (type(condemned).__name__ == "DiskIdSet")
        source = SlowSource(base)
        started.append(run_in_thread(lambda: backup_disk(vault, source, BackupId.parse(B), threads=1)))
        assert source.reading.wait(30)  # it holds its lock and has read the condemned list
        real_wait(self)  # and gc waits for it

    monkeypatch.setattr(gc_module._Gc, "_wait_for_backups", backup_then_wait)
    report = collect_garbage(vault, grace=0, poll=0.02)

    (thread, out), = started
    res: BackupResult = result(thread, out)
    assert report.waited_seconds > 0
    assert not on_disk or any(len(s) == report.live_chunks for s in finished)  # gc's live set was on disk too
    distinct = set(vault.read_manifest(BackupId.parse(B)).chunk_ids) - {ZERO_ID}
    assert res.stats.chunks_deduplicated == 0, "condemned chunks are treated as absent"
    assert res.stats.chunks_new == len(distinct), "every one of them is stored again"
    assert_restores(vault, B, base, tmp_path)
    assert_restores(vault, C, other, tmp_path)
    assert_verifies(vault)
    assert_index_points_at_existing_packs(vault)


def test_a_backup_committing_after_the_sweep_keeps_the_chunks_it_stored_again(
        deleted_base: tuple[Vault, Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The dangerous order: the backup starts after gc listed the locks it waits for, stores the
    # condemned chunks again (in new packs) and commits only after gc
    # has deleted those. What it stored must survive.
    vault, base, other = deleted_base
    real_wait = gc_module._Gc._wait_for_backups
    gc_done = threading.Event()
    committing = threading.Event()
    real_write_backup = vault.write_backup

    def write_backup_after_gc(*args: Any, **kwargs: Any) -> None:
        committing.set()
        assert gc_done.wait(60)
        real_write_backup(*args, **kwargs)

    monkeypatch.setattr(vault, "write_backup", write_backup_after_gc)
    threads: list[tuple[threading.Thread, list[Any]]] = []

    def wait_then_backup(self: gc_module._Gc) -> None:
        real_wait(self)  # lists the running backups: none
        threads.append(run_in_thread(lambda: backup(vault, base, B, threads=1)))
        # Let the backup store everything (it may instead wait for this gc to finish first).
        committing.wait(2)

    monkeypatch.setattr(gc_module._Gc, "_wait_for_backups", wait_then_backup)
    collect_garbage(vault, grace=0, poll=0.02)
    gc_done.set()
    (thread, out), = threads
    res: BackupResult = result(thread, out)

    assert res.stats.chunks_deduplicated == 0
    assert_restores(vault, B, base, tmp_path)
    assert_restores(vault, C, other, tmp_path)
    assert_verifies(vault)
    assert_index_points_at_existing_packs(vault)


def test_a_chunk_not_condemned_survives_even_if_its_last_backup_is_deleted_during_gc(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pack P: ten chunks. x used all of them (deleted: 40% of P is garbage, so P is repacked);
    # d uses chunks 0-5. Backup e starts after gc published its condemned list (chunks 6-9) and
    # reuses 0-5; then d is deleted, before gc looks at the backups again and before e commits.
    # Chunks 0-5 were never condemned, so e may rely on them: the repack must keep them.
    vault = make_vault(tmp_path / "vault", pack_size=10 * K64)
    chunks = [random_chunk(i) for i in range(10)]
    img_x = chunk_image(tmp_path / "x.img", chunks)
    img_d = chunk_image(tmp_path / "d.img", chunks[:6] + [None] * 4)
    backup(vault, img_x, "j/x/vm1/vda", threads=1)
    backup(vault, img_d, "j/d/vm1/vda", threads=1)
    age_packs(vault)
    vault.delete_backup(BackupId.parse("j/x/vm1/vda"))

    real_wait = gc_module._Gc._wait_for_backups
    gc_done, committing = threading.Event(), threading.Event()
    real_write_backup = vault.write_backup

    def write_backup_after_gc(*args: Any, **kwargs: Any) -> None:
        committing.set()
        assert gc_done.wait(60)
        real_write_backup(*args, **kwargs)

    monkeypatch.setattr(vault, "write_backup", write_backup_after_gc)
    started: list[tuple[threading.Thread, list[Any]]] = []

    def wait_then_backup_then_delete(self: gc_module._Gc) -> None:
        real_wait(self)
        started.append(run_in_thread(lambda: backup(vault, img_d, "j/e/vm1/vda", threads=1)))
        assert committing.wait(30)  # e has deduplicated chunks 0-5 against P
        vault.delete_backup(BackupId.parse("j/d/vm1/vda"))

    monkeypatch.setattr(gc_module._Gc, "_wait_for_backups", wait_then_backup_then_delete)
    report = collect_garbage(vault, grace=0)
    gc_done.set()
    (thread, out), = started
    res: BackupResult = result(thread, out)

    assert res.stats.chunks_deduplicated == 6 and res.stats.chunks_new == 0
    assert report.packs_repacked == 1
    assert_restores(vault, "j/e/vm1/vda", img_d, tmp_path)
    assert_verifies(vault)


def age_manifests(vault: Vault, seconds: float = 2 * HOUR) -> None:
    then = time.time() - seconds
    for bid in vault.backup_ids():
        os.utime(root(vault) / bid.backup_key, (then, then))


def test_the_re_mark_reads_only_the_manifests_written_since_the_mark(
        deleted_base: tuple[Vault, Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    vault, _base, other = deleted_base
    age_manifests(vault)
    read: list[str] = []
    real_read, real_wait = vault.read_manifest, gc_module._Gc._wait_for_backups
    monkeypatch.setattr(vault, "read_manifest", lambda bid: read.append(str(bid)) or real_read(bid))

    def backup_during_the_wait(self: gc_module._Gc) -> None:
        real_wait(self)
        read.clear()  # what the mark read
        backup(vault, other, "j/new/vm2/vda", threads=1)  # commits after the mark, before the re-mark

    monkeypatch.setattr(gc_module._Gc, "_wait_for_backups", backup_during_the_wait)
    report = collect_garbage(vault, grace=0)

    assert report.backups == 1 and report.backups_remarked == 1
    assert [r for r in read if r != "j/new/vm2/vda"] == []  # c, unchanged since the mark, is not read again
    assert_restores(vault, "j/new/vm2/vda", other, tmp_path)
    assert_restores(vault, C, other, tmp_path)
    assert_verifies(vault)


def test_the_re_mark_reads_what_changed_since_the_mark_and_what_was_written_just_before_it(
        three_backups: tuple[Vault, dict[str, Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    # A backup deleted and made again under its id while gc waits can list with the size and time the
    # mark saw (an object store's times are coarse): a manifest written just before the mark is read again.
    vault, _imgs = three_backups
    gc = gc_module._Gc(vault, 0, 600, 0.25, False, 0.02, time.time, None, None)  # type: ignore[arg-type]
    now = time.time()
    old, recent, changed, gone = (BackupId.parse(b) for b in ("j/old/vm/vda", "j/recent/vm/vda",
                                                              "j/changed/vm/vda", "j/gone/vm/vda"))
    gc.marked_at = now
    gc.marked = {old: ObjectInfo(old.backup_key, 100, now - 2 * HOUR),
                 recent: ObjectInfo(recent.backup_key, 100, now - 10),
                 changed: ObjectInfo(changed.backup_key, 100, now - 2 * HOUR),
                 gone: ObjectInfo(gone.backup_key, 100, now - 2 * HOUR)}
    new = BackupId.parse("j/new/vm/vda")
    listing = {**gc.marked, changed: ObjectInfo(changed.backup_key, 120, now - 2 * HOUR),
               new: ObjectInfo(new.backup_key, 100, now + 5)}
    del listing[gone]
    monkeypatch.setattr(vault, "backup_objects", lambda: listing)

    assert gc._written_since_mark() == sorted([recent, changed, new])
    assert gc.report.backups_remarked == 3


def test_gc_gives_up_when_a_backup_outlasts_max_wait(three_backups: tuple[Vault, dict[str, Path]],
                                                    tmp_path: Path) -> None:
    vault, imgs = three_backups
    vault.delete_backup(BackupId.parse(C))
    before = snapshot(vault)
    with vault.locks.acquire(LockKind.SHARED, "backup j/r7/vm7/vda") as held:
        with pytest.raises(VaultLocked):
            collect_garbage(vault, grace=0, max_wait=0.2, poll=0.02)
        assert {i.key for i in vault.backend.list("locks/")} == {held.key}, "no gc lock, no condemned list"
    assert snapshot(vault) == before  # nothing deleted, no index consolidated
    for bid in (A, B):
        assert_restores(vault, bid, imgs[bid], tmp_path)
    # Later, with the backup gone, gc goes through.
    assert collect_garbage(vault, grace=0).packs_deleted > 0


def test_gc_removes_staging_files_a_killed_backup_left_once_past_the_grace(tmp_path: Path) -> None:
    vault = make_vault(tmp_path / "vault")
    staging = vault.backend.staging_dir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    writer = subprocess.Popen(["sleep", "60"])  # a backup still writing its pack
    try:
        old = staging / f"pack-{dead.pid}-00.partial"  # its writer is gone
        busy = staging / f"pack-{writer.pid}-22.partial"  # as old, but its writer still runs
        for path in (old, busy):
            path.write_bytes(b"half a pack")
        time.sleep(1.0)
        fresh = staging / f"pack-{dead.pid}-11.partial"  # its writer is gone, but younger than the grace
        fresh.write_bytes(b"half a pack")

        report = collect_garbage(vault, grace=0.5)
    finally:
        writer.kill()
        writer.wait()

    assert report.staging_files_removed == 1
    assert not old.exists() and fresh.exists() and busy.exists()


def test_a_staging_file_older_than_the_process_with_its_writers_pid_is_removed(tmp_path: Path) -> None:
    """The writer's pid went to a younger process (a new pid namespace, a machine handed on): not its writer."""
    vault = make_vault(tmp_path / "vault")
    reused = subprocess.Popen(["sleep", "60"])
    try:
        stale = vault.backend.staging_dir() / f"pack-{reused.pid}-00.partial"
        stale.write_bytes(b"half a pack")
        os.utime(stale, (time.time() - 7200, time.time() - 7200))  # written two hours before that process began

        report = collect_garbage(vault, grace=3600)
    finally:
        reused.kill()
        reused.wait()

    assert report.staging_files_removed == 1 and not stale.exists()


# -- a vault too large for memory -------------------------------------------------------------------


def test_a_vault_too_large_for_memory_is_collected_the_same(three_backups: tuple[Vault, dict[str, Path]],
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past IDS_IN_MEMORY the live chunks go to a temporary file and the index's rows are grouped by
    pack in spilled partitions: two copies of one vault, one collected each way, end the same. The
    vault also holds chunks stored twice (a pack copying some of b's), which are counted once."""
    import shutil

    vault, imgs = three_backups
    index = vault.load_index()
    packer = Packer(vault)  # a second copy of 40 of b's chunks, in packs of their own
    for cid in [c for c in vault.read_manifest(BackupId.parse(B)).chunk_ids if c != ZERO_ID][:40]:
        loc = index.locations[cid]
        packer.add(cid, vault.read_blob(loc), loc.raw_length)
    packer.flush()
    age_packs(vault)
    vault.delete_backup(BackupId.parse(A))  # b's packs hold a's chunks too: some go, some are repacked
    twin_root = tmp_path / "twin"
    shutil.copytree(root(vault), twin_root)
    twin = Vault.open(LocalBackend(twin_root))

    in_memory = collect_garbage(vault, grace=0)

    finished = sets_on_disk(monkeypatch)
    on_disk = collect_garbage(twin, grace=0)

    assert finished, "the live chunks went to a temporary file"
    assert any(s._what == "the chunks this gc condemns" for s in finished), "and so did the condemned ones"
    assert in_memory.packs_deleted > 0 and in_memory.packs_repacked > 0
    mine, theirs = in_memory.to_dict(), on_disk.to_dict()
    # The repack copies the same chunks, perhaps in another order, so its packs' headers differ a little.
    assert abs(theirs.pop("bytes_freed") - mine.pop("bytes_freed")) < 1024
    for key in ("seconds", "waited_seconds", "backups_remarked"):  # by the clock: the re-mark reads recent manifests
        del mine[key], theirs[key]
    assert theirs == mine
    assert len(pack_ids(twin)) == len(pack_ids(vault))
    for v in (vault, twin):
        assert_index_points_at_existing_packs(v)
        assert_restores(v, B, imgs[B], tmp_path)
        assert_restores(v, C, imgs[C], tmp_path)
        assert_verifies(v)


def test_gc_reports_the_progress_of_its_mark_and_its_repack(three_backups: tuple[Vault, dict[str, Path]]) -> None:
    vault, _imgs = three_backups
    vault.delete_backup(BackupId.parse(A))  # b shares most of a's packs: they are repacked
    events: list[Any] = []

    report = collect_garbage(vault, grace=0, progress=events.append)

    mark = [e for e in events if e.phase == "gc: mark"]
    assert (mark[-1].done, mark[-1].total, mark[-1].unit) == (2, 2, "backups") == (report.backups, 2, "backups")
    repack = [e for e in events if e.phase == "gc: repack"]
    assert report.packs_repacked > 0 and repack, "copying live chunks out of packs is reported"
    assert repack[-1].unit == "B" and repack[-1].done == repack[-1].total > 0
    assert all(e.done <= e.total for e in repack)
