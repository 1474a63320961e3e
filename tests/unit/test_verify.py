"""`raksha vault verify`: re-read everything backups reference and name exactly the damaged ones.

Damage is made by hand in a real vault directory: a flipped byte inside one blob, a deleted
pack, a scribbled index or manifest.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import K64, chunk_image, index_objects, random_chunk, sets_on_disk
from raksha.domain.data_subset import DataSubset
from raksha.domain.errors import InvalidInput
from raksha.vault.backends.local import LocalBackend
from raksha.vault.engine.backup import backup_disk
from raksha.vault.engine.progress import ProgressEvent
from raksha.vault.format.chunk_table import ChunkTable
from raksha.vault.format.config import VaultConfig
from raksha.vault.format.constants import ZERO_ID
from raksha.vault.format.index import Location
from raksha.vault.format.keys import KdfParams, Secret
from raksha.vault.format.naming import BackupId
from raksha.vault.format.pack import pack_key
from raksha.vault.format.rows_by_pack import RowsByPack
from raksha.vault.operations import verify as verify_module
from raksha.vault.operations.gc import collect_garbage
from raksha.vault.operations.verify import VerifyReport, verify_vault
from raksha.vault.repository import Vault
from raksha.vault.sources.raw import RawSource

A, B, C = "j/r1/vm1/vda", "j/r2/vm1/vda", "j/r1/vm2/vda"


def backup(vault: Vault, img: Path, bid: str) -> None:
    source = RawSource(str(img))
    try:
        backup_disk(vault, source, BackupId.parse(bid), threads=1)
    finally:
        source.close()


def flip_byte(vault: Vault, key: str, offset: int) -> None:
    path = Path(vault.backend.url) / key
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def location(vault: Vault, data: bytes) -> Location:
    loc = vault.load_index().get(vault.crypto.chunk_id(data))
    assert loc is not None
    return loc


@pytest.fixture(params=[False, True], ids=["plain", "encrypted"])
def vault(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Vault]:
    """Three backups in a vault whose packs hold ten 64 KiB chunks:

    - a: chunks 0-9, all in one pack P;
    - b: chunks 0-4 (shared with a, so in P too) and zeros;
    - c: chunks 10-19, in a pack of their own.
    """
    config = VaultConfig.new(chunk_size=K64, pack_size=10 * K64, encrypted=request.param)
    secret = Secret(passphrase=b"verify test") if request.param else None
    v = Vault.init(LocalBackend(tmp_path / "vault", create=True), config, secret, KdfParams(memory_kib=8192))
    chunks = [random_chunk(i) for i in range(20)]
    backup(v, chunk_image(tmp_path / "a.img", chunks[:10]), A)
    backup(v, chunk_image(tmp_path / "b.img", chunks[:5] + [None] * 5), B)
    backup(v, chunk_image(tmp_path / "c.img", chunks[10:]), C)
    yield v


def test_a_clean_vault_verifies(vault: Vault) -> None:
    report = verify_vault(vault, threads=2)

    assert report.ok, report.summary()
    assert report.backups_checked == 3
    assert report.chunks_checked == 20  # each distinct chunk once, however many backups use it
    assert report.packs_checked == 2
    assert report.bytes_read == sum(size for _pid, size, _mtime in vault.iter_packs())
    assert report.damaged_backups == {} and report.damaged_objects == []
    assert "no damage found" in report.summary()


def test_a_flipped_byte_names_only_the_backup_using_that_chunk(vault: Vault) -> None:
    # Chunk 7 lies in the pack a and b share, but only a uses it.
    loc = location(vault, random_chunk(7))
    assert location(vault, random_chunk(2)).pack_id == loc.pack_id
    flip_byte(vault, pack_key(loc.pack_id.hex()), loc.offset + loc.stored_length // 2)

    report = verify_vault(vault)

    assert not report.ok
    assert set(report.damaged_backups) == {A}
    (reason,) = report.damaged_backups[A]
    assert vault.crypto.chunk_id(random_chunk(7)).hex() in reason
    assert [d["object"] for d in report.damaged_objects] == [pack_key(loc.pack_id.hex())]
    assert "DAMAGE FOUND" in report.summary() and A in report.summary()


def test_a_flipped_byte_in_a_shared_chunk_names_every_backup_using_it(vault: Vault) -> None:
    loc = location(vault, random_chunk(2))
    flip_byte(vault, pack_key(loc.pack_id.hex()), loc.offset + 100)

    report = verify_vault(vault)

    # Not c: its chunks are in another pack. And b, although verify reads it right after a and looks up
    # only the ids where b differs from a: a was damaged, so b is checked whole.
    assert set(report.damaged_backups) == {A, B}


def test_packs_are_read_in_pieces_that_cut_through_blobs(vault: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread holds a piece of a pack, not the pack: blobs cut by piece edges are still checked whole."""
    monkeypatch.setattr(verify_module, "READ_PIECE", 5000)  # a 64 KiB blob spans 14 pieces
    clean = verify_vault(vault)
    assert clean.ok and clean.chunks_checked == 20
    assert clean.bytes_read == sum(size for _pid, size, _mtime in vault.iter_packs())

    loc = location(vault, random_chunk(7))
    flip_byte(vault, pack_key(loc.pack_id.hex()), loc.offset + 4999)
    report = verify_vault(vault)
    assert set(report.damaged_backups) == {A} and report.chunks_checked == 20


def test_a_truncated_pack_names_the_chunks_it_lost(vault: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify_module, "READ_PIECE", 5000)
    loc = location(vault, random_chunk(15))  # c's pack
    key = pack_key(loc.pack_id.hex())
    path = Path(vault.backend.url) / key
    os.truncate(path, loc.offset + 100)  # chunk 15 cut, 16-19 gone, and the header

    report = verify_vault(vault)

    assert set(report.damaged_backups) == {C} and len(report.damaged_backups[C]) == 5
    assert any(d["object"] == key and "header" in d["error"] for d in report.damaged_objects)


def test_a_missing_pack_names_every_backup_using_it(vault: Vault) -> None:
    pack = pack_key(location(vault, random_chunk(0)).pack_id.hex())
    vault.backend.delete(pack)

    report = verify_vault(vault)

    assert set(report.damaged_backups) == {A, B}
    assert len(report.damaged_backups[A]) == 10 and len(report.damaged_backups[B]) == 5  # one per chunk
    assert all("missing" in why for why in report.damaged_backups[A])
    assert {"object": pack, "error": "missing"} in report.damaged_objects


def test_a_damaged_index_object_is_reported(vault: Vault) -> None:
    cid = vault.crypto.chunk_id(random_chunk(12))
    (index_id,) = [i for i, f in index_objects(vault).items() if cid in f.entries]  # c's pack's index
    index_key = f"index/{index_id}"
    flip_byte(vault, index_key, 10)

    report = verify_vault(vault)

    assert [d["object"] for d in report.damaged_objects] == [index_key]
    assert set(report.damaged_backups) == {C}  # its chunks are now in no readable index
    assert all("no index entry" in why for why in report.damaged_backups[C])


def test_an_index_object_under_a_wrong_name_is_reported_and_still_used(vault: Vault) -> None:
    cid = vault.crypto.chunk_id(random_chunk(12))
    (index_id,) = [i for i, f in index_objects(vault).items() if cid in f.entries]
    root = Path(vault.backend.url)
    wrong = "ab" * 32
    (root / "index" / index_id).rename(root / "index" / wrong)

    report = verify_vault(vault)

    assert [(d["object"], d["error"]) for d in report.damaged_objects] == [
        (f"index/{wrong}", "content does not match its name (damaged)")]
    assert report.damaged_backups == {}  # its entries still count: C's chunks are found


def test_a_damaged_manifest_names_that_backup(vault: Vault) -> None:
    key = BackupId.parse(B).backup_key
    flip_byte(vault, key, os.path.getsize(Path(vault.backend.url) / key) - 5)

    report = verify_vault(vault)

    assert set(report.damaged_backups) == {B}
    (reason,) = report.damaged_backups[B]
    assert reason.startswith("VAULT_CORRUPT")
    assert report.backups_checked == 3


def test_damaged_metadata_names_the_backup_and_its_data_is_still_checked(vault: Vault) -> None:
    flip_byte(vault, BackupId.parse(C).metadata_key, 8)
    loc = location(vault, random_chunk(15))
    flip_byte(vault, pack_key(loc.pack_id.hex()), loc.offset + 9)

    report = verify_vault(vault)

    assert set(report.damaged_backups) == {C}
    reasons = report.damaged_backups[C]
    assert any(r.startswith("metadata:") for r in reasons)
    assert any(vault.crypto.chunk_id(random_chunk(15)).hex() in r for r in reasons)


def test_without_reading_data_missing_chunks_and_packs_are_still_found(vault: Vault) -> None:
    a_pack = location(vault, random_chunk(0))
    c_pack = location(vault, random_chunk(10))
    # A flipped byte needs the data read to be seen ...
    flip_byte(vault, pack_key(a_pack.pack_id.hex()), a_pack.offset + 50)
    report = verify_vault(vault, read_data=False)
    assert report.ok and not report.read_data
    assert report.bytes_read == report.packs_checked == report.chunks_checked == 0

    # ... a lost pack does not.
    vault.backend.delete(pack_key(c_pack.pack_id.hex()))
    report = verify_vault(vault, read_data=False)
    assert set(report.damaged_backups) == {C}
    assert report.bytes_read == 0

    # Nor do chunks that no index lists.
    for info in list(vault.backend.list("index/")):
        vault.backend.delete(info.key)
    report = verify_vault(vault, read_data=False)
    assert set(report.damaged_backups) == {A, B, C}
    assert all("no index entry" in why for whys in report.damaged_backups.values() for why in whys)


def test_report_is_json_serialisable(vault: Vault) -> None:
    vault.backend.delete(pack_key(location(vault, random_chunk(10)).pack_id.hex()))
    flip_byte(vault, BackupId.parse(B).backup_key, 20)

    doc = json.loads(json.dumps(verify_vault(vault).to_dict()))

    assert doc["ok"] is False and doc["read_data"] is True
    assert set(doc["damaged_backups"]) == {B, C}
    assert doc["damaged_objects"][0]["error"] == "missing"


def verify_with_index(vault: Vault, stale: ChunkTable, monkeypatch: pytest.MonkeyPatch,
                      subset: DataSubset | None = None) -> VerifyReport:
    """Verify, reading ``stale`` where it reads the index first (as if a gc ran right after)."""
    def first_read_is_stale(self: verify_module._Verify) -> RowsByPack:
        rows = RowsByPack(len(stale), "stale rows")
        rows.add_rows(stale.rows())
        return rows

    monkeypatch.setattr(verify_module._Verify, "_index_rows", first_read_is_stale)
    return verify_vault(vault, subset=subset)


@pytest.mark.parametrize("subset", [None, "1/2", "2/2"])
def test_chunks_a_concurrent_gc_moved_are_not_reported_missing(vault: Vault, monkeypatch: pytest.MonkeyPatch,
                                                               subset: str | None) -> None:
    # Verify reads the index, then a gc repacks: the packs verify was going to read are gone,
    # their chunks live on elsewhere. Verify looks them up again instead of crying "missing".
    stale = vault.load_index().locations
    vault.delete_backup(BackupId.parse(A))  # leaves half of pack P garbage: gc repacks it
    then = 0.0
    for info in vault.backend.list("data/"):
        os.utime(Path(vault.backend.url) / info.key, (then, then))
    assert collect_garbage(vault, grace=0).packs_repacked == 1
    assert {loc.pack_id for loc in vault.load_index().locations.values()} != {loc.pack_id for loc in stale.values()}

    # With a subset, a vanished pack outside it is found gone by its size check, and looked up again too.
    report = verify_with_index(vault, stale, monkeypatch, DataSubset.parse(subset) if subset else None)

    assert report.ok, report.summary()
    if subset is None:
        used = {cid for bid in (B, C) for cid in vault.read_manifest(BackupId.parse(bid)).chunk_ids} - {ZERO_ID}
        assert report.chunks_checked == len(used)


def test_a_pack_a_concurrent_gc_deleted_as_garbage_is_not_reported(vault: Vault,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Verify reads every pack the index lists, garbage too: one that a gc deletes meanwhile (its backup
    # pruned) is gone and indexed nowhere. That is no damage.
    stale = vault.load_index().locations
    vault.delete_backup(BackupId.parse(C))  # c's pack is all garbage now
    for info in vault.backend.list("data/"):
        os.utime(Path(vault.backend.url) / info.key, (0.0, 0.0))
    assert collect_garbage(vault, grace=0).packs_deleted == 1

    report = verify_with_index(vault, stale, monkeypatch)

    assert report.ok, report.summary()
    assert report.backups_checked == 2 and report.packs_checked == 1


def test_a_vault_too_large_for_memory_gives_the_same_verdicts(vault: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past IDS_IN_MEMORY the sound chunks go to a temporary file, and the index's rows are grouped by
    pack in spilled partitions: the verdicts do not change."""
    loc = location(vault, random_chunk(7))
    flip_byte(vault, pack_key(loc.pack_id.hex()), loc.offset + 100)
    vault.backend.delete(pack_key(location(vault, random_chunk(10)).pack_id.hex()))
    in_memory = verify_vault(vault)

    finished = sets_on_disk(monkeypatch)
    on_disk = verify_vault(vault)

    assert len(finished) == 1 and len(finished[0]) == 9  # the sound chunks: 0-6, 8, 9
    assert on_disk.damaged_backups == in_memory.damaged_backups
    assert set(on_disk.damaged_backups) == {A, C} and len(on_disk.damaged_backups[C]) == 10
    assert on_disk.damaged_objects == in_memory.damaged_objects
    assert (on_disk.chunks_checked, on_disk.packs_checked) == (in_memory.chunks_checked, in_memory.packs_checked)


def test_a_disks_next_backup_is_looked_up_only_where_its_ids_differ(vault: Vault) -> None:
    a, b = (vault.read_manifest(BackupId.parse(bid)) for bid in (A, B))  # b: a's chunks 0-4, then zeros
    ids = [vault.crypto.chunk_id(random_chunk(i)) for i in range(10)]

    assert list(verify_module._ids_not_in(a, None)) == ids
    assert list(verify_module._ids_not_in(a, a.chunk_ids)) == []  # the same ids at the same places: checked
    assert list(verify_module._ids_not_in(b, a.chunk_ids)) == []  # the same, or zeros
    assert list(verify_module._ids_not_in(a, b.chunk_ids)) == ids[5:]  # what b had as zeros



# -- a subset of the packs' data (--read-data-subset) ---------------------------------------------


@pytest.fixture
def many_packs(tmp_path: Path) -> Vault:
    """One backup of 16 distinct 64 KiB chunks in packs of two: eight packs."""
    config = VaultConfig.new(chunk_size=K64, pack_size=2 * K64)
    v = Vault.init(LocalBackend(tmp_path / "vault", create=True), config)
    backup(v, chunk_image(tmp_path / "a.img", [random_chunk(i) for i in range(16)]), A)
    assert len(list(v.iter_packs())) == 8
    return v


def pack_of(vault: Vault, i: int) -> str:
    return pack_key(location(vault, random_chunk(i)).pack_id.hex())


def test_the_groups_of_a_subset_read_every_pack_once_between_them(many_packs: Vault) -> None:
    reports = [verify_vault(many_packs, subset=DataSubset.parse(f"{n}/3")) for n in (1, 2, 3)]

    assert all(r.ok for r in reports)
    assert sum(r.packs_checked for r in reports) == 8  # each pack's data read by one run
    assert all(r.packs_checked + r.packs_not_read == 8 for r in reports)
    assert sum(r.chunks_checked for r in reports) == 16
    assert sum(r.bytes_read for r in reports) == sum(size for _pid, size, _mtime in many_packs.iter_packs())
    assert all(r.read_data_subset == f"{n}/3" for n, r in zip((1, 2, 3), reports, strict=True))


def test_damaged_data_is_found_by_the_run_whose_subset_reads_it_and_said_by_none_other(many_packs: Vault) -> None:
    loc = location(many_packs, random_chunk(5))
    flip_byte(many_packs, pack_of(many_packs, 5), loc.offset + 40)

    reports = [verify_vault(many_packs, subset=DataSubset.parse(f"{n}/4")) for n in (1, 2, 3, 4)]

    finding = [r for r in reports if not r.ok]
    assert len(finding) == 1 and set(finding[0].damaged_backups) == {A}
    clean = [r for r in reports if r.ok]
    # A clean report of a subset says how much it did not read.
    assert all("data read of subset" in r.summary() and "checked for presence and size" in r.summary()
               for r in clean)


def test_a_missing_or_truncated_pack_is_found_whichever_subset_runs(many_packs: Vault) -> None:
    gone, short = pack_of(many_packs, 0), pack_of(many_packs, 15)
    many_packs.backend.delete(gone)
    path = Path(many_packs.backend.url) / short
    os.truncate(path, path.stat().st_size // 2)

    for n in (1, 2, 3, 4):
        report = verify_vault(many_packs, subset=DataSubset.parse(f"{n}/4"))
        assert set(report.damaged_backups) == {A}
        damaged = report.damaged_backups[A]
        assert any(gone in why for why in damaged), (n, damaged)
        assert any(random_chunk_id(many_packs, 15) in why for why in damaged), (n, damaged)


def random_chunk_id(vault: Vault, i: int) -> str:
    return vault.crypto.chunk_id(random_chunk(i)).hex()


def test_a_percentage_reads_a_random_share_and_all_of_it_at_100(many_packs: Vault) -> None:
    full = verify_vault(many_packs, subset=DataSubset.parse("100%"))
    assert full.packs_checked == 8 and full.packs_not_read == 0 and full.chunks_checked == 16

    seen = set()
    for seed in range(6):
        report = verify_vault(many_packs, subset=DataSubset.parse("50%"), rng=random.Random(seed))
        assert report.ok and report.packs_checked + report.packs_not_read == 8
        seen.add(report.packs_checked)
    assert len(seen) > 1  # drawn anew each run


def test_a_subset_needs_the_data_read(many_packs: Vault) -> None:
    with pytest.raises(InvalidInput) as err:
        verify_vault(many_packs, read_data=False, subset=DataSubset.parse("1/2"))
    assert err.value.code == "SUBSET_INVALID"


def test_the_progress_of_a_subset_never_passes_100_percent(many_packs: Vault) -> None:
    """Its total is an estimate (10% of the stored bytes here): a run whose draw takes more ends at 100%."""
    class EveryPack(random.Random):
        def random(self) -> float:
            return 0.0

    events: list[ProgressEvent] = []
    report = verify_vault(many_packs, subset=DataSubset.parse("10%"), rng=EveryPack(), progress=events.append)
    assert report.packs_checked == 8
    assert events[-1].done > events[-1].total  # the estimate was passed ...
    assert all(0 <= e.fraction <= 1 and (e.eta is None or e.eta >= 0) for e in events)  # ... and not shown so
