"""`raksha vault prune`: apply a retention policy to each disk's series of backups (job/vm/disk).

Most tests write backups straight through ``Vault.write_backup`` with chosen creation times
(all-zero disks: no packs needed); the space test backs real images up through the engine and
then back-dates their metadata.
"""

from __future__ import annotations

import os
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import blake3
import pytest

from raksha.domain.errors import InvalidInput, VaultLocked
from raksha.domain.retention import RetentionPolicy
from raksha.vault.backends.local import LocalBackend
from raksha.vault.backends.memory import MemoryBackend
from raksha.vault.engine.backup import backup_disk
from raksha.vault.engine.restore import restore_backup
from raksha.vault.format.config import VaultConfig
from raksha.vault.format.constants import ZERO_ID
from raksha.vault.format.manifest import Manifest, encode_metadata
from raksha.vault.format.naming import BackupId
from raksha.vault.locks import LockKind
from raksha.vault.operations.gc import collect_garbage
from raksha.vault.operations.prune import prune
from raksha.vault.repository import Vault
from raksha.vault.sources.raw import RawSource

K64 = 64 << 10
MONDAY = datetime(2026, 11, 2, 0, 30, tzinfo=UTC)


def iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def memory_vault() -> Vault:
    return Vault.init(MemoryBackend(), VaultConfig.new(chunk_size=K64))


def add_backup(vault: Vault, bid: str, created: datetime) -> None:
    """A backup of an all-zero 128 KiB disk made at ``created``."""
    manifest = Manifest(BackupId.parse(bid), 2 * K64, K64, [ZERO_ID, ZERO_ID], "raw", iso(created))
    vault.write_backup(manifest, {"created": iso(created), "kind": "full", "parent": None,
                                  "source": {"path": "/dev/zero", "format": "raw", "virtual_size": 2 * K64}})


def set_created(vault: Vault, bid: str, created: datetime) -> None:
    """Back-date an existing backup's metadata."""
    backup_id = BackupId.parse(bid)
    meta = vault.read_metadata(backup_id)
    meta["created"] = iso(created)
    vault.backend.put(backup_id.metadata_key, encode_metadata(backup_id, meta, vault.crypto), overwrite=True)


def ids(vault: Vault) -> list[str]:
    return [str(b) for b in vault.backup_ids()]


def series(vault: Vault, job: str, vm: str, days: int, per_day: int = 1) -> list[str]:
    """Backups ``job/dDhH/vm/vda``: ``per_day`` a day, every 8 hours, for ``days`` days from MONDAY."""
    made = []
    for day in range(days):
        for n in range(per_day):
            t = MONDAY + timedelta(days=day, hours=8 * n)
            bid = f"{job}/d{day}h{8 * n:02d}/{vm}/vda"
            add_backup(vault, bid, t)
            made.append(bid)
    return made


def test_keep_last_keeps_the_newest_of_each_disk() -> None:
    vault = memory_vault()
    vm1 = series(vault, "nightly", "vm1", days=5)
    vm2 = series(vault, "nightly", "vm2", days=3)
    other_job = series(vault, "weekly", "vm1", days=2)

    report = prune(vault, RetentionPolicy(keep_last=2))

    assert ids(vault) == sorted(vm1[-2:] + vm2[-2:] + other_job)
    assert sorted(report.deleted) == sorted(vm1[:3] + vm2[:1])
    assert dict(report.kept)[vm1[-1]] == ["last"]


def test_keep_daily_keeps_the_newest_backup_of_each_recent_day() -> None:
    vault = memory_vault()
    vm1 = series(vault, "nightly", "vm1", days=5, per_day=3)  # 00:30, 08:30, 16:30 each day
    vm2 = series(vault, "nightly", "vm2", days=2, per_day=3)

    report = prune(vault, RetentionPolicy(keep_daily=3))

    newest_of_day = [bid for bid in vm1 if "h16" in bid]
    assert [b for b in ids(vault) if "/vm1/" in b] == sorted(newest_of_day[-3:])  # days 2, 3, 4
    assert [b for b in ids(vault) if "/vm2/" in b] == sorted(b for b in vm2 if "h16" in b)  # it has 2 days
    assert dict(report.kept)["nightly/d4h16/vm1/vda"] == ["daily 2026-11-06"]
    assert len(report.deleted) == 15 - 3 + 6 - 2


def test_policies_combine_and_the_reasons_are_reported() -> None:
    vault = memory_vault()
    vm1 = series(vault, "nightly", "vm1", days=10)

    report = prune(vault, RetentionPolicy(keep_last=1, keep_daily=3, keep_weekly=2))

    kept = dict(report.kept)
    assert kept[vm1[-1]] == ["last", "daily 2026-11-11", "weekly 2026-W46"]
    assert kept[vm1[6]] == ["weekly 2026-W45"]  # Sunday 8 November: the newest of the week before
    assert set(kept) == {vm1[-1], vm1[-2], vm1[-3], vm1[6]}
    assert ids(vault) == sorted(kept)


def test_dry_run_deletes_nothing() -> None:
    vault = memory_vault()
    series(vault, "nightly", "vm1", days=5)
    before = ids(vault)

    report = prune(vault, RetentionPolicy(keep_last=1), dry_run=True)

    assert report.dry_run and len(report.deleted) == 4
    assert ids(vault) == before
    assert "would delete" in report.summary()
    assert report.to_dict()["deleted"] == report.deleted


def test_prefix_limits_prune_to_one_job() -> None:
    vault = memory_vault()
    nightly = series(vault, "nightly", "vm1", days=4)
    weekly = series(vault, "weekly", "vm1", days=4)

    prune(vault, RetentionPolicy(keep_last=1), prefix="nightly/")

    assert ids(vault) == sorted(nightly[-1:] + weekly)


def test_an_empty_policy_is_refused() -> None:
    vault = memory_vault()
    made = series(vault, "nightly", "vm1", days=3)

    with pytest.raises(InvalidInput) as err:
        prune(vault, RetentionPolicy())

    assert err.value.code == "RETENTION_EMPTY"
    assert ids(vault) == made
    assert not list(vault.backend.list("locks/"))


def test_a_backup_with_unreadable_metadata_is_dated_by_its_manifest() -> None:
    vault = memory_vault()
    made = series(vault, "nightly", "vm1", days=4)
    newest = BackupId.parse(made[-1])
    vault.backend.put(newest.metadata_key, b"RKMD\x01\x00scribbled", overwrite=True)

    prune(vault, RetentionPolicy(keep_last=1))

    assert ids(vault) == [made[-1]]  # not taken for a 1970 backup and deleted first


def test_a_backup_that_cannot_be_dated_is_kept() -> None:
    vault = memory_vault()
    made = series(vault, "nightly", "vm1", days=4)
    oldest = BackupId.parse(made[0])
    for key in (oldest.metadata_key, oldest.backup_key):
        vault.backend.put(key, b"scribbled", overwrite=True)

    report = prune(vault, RetentionPolicy(keep_last=1))

    assert ids(vault) == [made[0], made[-1]]
    assert "undated" in dict(report.kept)[made[0]][0]


def test_prune_waits_its_turn_behind_gc() -> None:
    vault = memory_vault()
    made = series(vault, "nightly", "vm1", days=3)
    with vault.locks.acquire(LockKind.MAINTENANCE, "gc"), pytest.raises(VaultLocked):
        prune(vault, RetentionPolicy(keep_last=1))
    assert ids(vault) == made


def test_prune_then_gc_frees_the_space_of_the_deleted_backups(tmp_path: Path) -> None:
    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=K64,
                                                                                      pack_size=8 * K64))
    images: dict[str, Path] = {}
    for day in range(4):  # a different 2 MiB disk each day
        img = tmp_path / f"day{day}.img"
        img.write_bytes(random.Random(day).randbytes(2 << 20))
        bid = f"nightly/d{day}/vm1/vda"
        source = RawSource(str(img))
        backup_disk(vault, source, BackupId.parse(bid))
        source.close()
        set_created(vault, bid, MONDAY + timedelta(days=day))
        images[bid] = img
    old = time.time() - 7200
    for info in vault.backend.list("data/"):
        os.utime(tmp_path / "vault" / info.key, (old, old))
    stored = sum(info.size for info in vault.backend.list("data/"))

    report = prune(vault, RetentionPolicy(keep_last=2))
    assert sorted(report.deleted) == ["nightly/d0/vm1/vda", "nightly/d1/vm1/vda"]
    assert "run 'raksha vault gc'" in report.summary()
    assert sum(info.size for info in vault.backend.list("data/")) == stored  # prune alone frees nothing

    freed = collect_garbage(vault, grace=0).bytes_freed

    left = sum(info.size for info in vault.backend.list("data/"))
    assert freed == stored - left
    assert 0.45 * stored < freed < 0.55 * stored  # two of four equally sized disks
    for bid in ids(vault):
        out = tmp_path / "restored.img"
        restore_backup(vault, BackupId.parse(bid), str(out))
        assert blake3.blake3(out.read_bytes()).digest() == blake3.blake3(images[bid].read_bytes()).digest()
        out.unlink()
