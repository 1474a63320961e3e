"""Losing every index object is recoverable: packs carry their own headers (format.md §13)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import index_objects
from raksha.vault.backends.local import LocalBackend
from raksha.vault.engine.backup import backup_disk
from raksha.vault.engine.restore import restore_backup
from raksha.vault.format.config import VaultConfig
from raksha.vault.format.keys import KdfParams, Secret
from raksha.vault.format.naming import BackupId
from raksha.vault.operations import rebuild_index as rebuild_module
from raksha.vault.operations.rebuild_index import rebuild_index
from raksha.vault.repository import Vault
from raksha.vault.sources.raw import RawSource


def test_a_vault_whose_indexes_are_all_lost_restores_after_rebuild(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(3 << 20) + bytes(1 << 20) + b"tail" * 1024)
    backend = LocalBackend(tmp_path / "vault", create=True)
    config = VaultConfig.new(chunk_size=64 << 10, pack_size=256 << 10, encrypted=True)
    vault = Vault.init(backend, config, Secret(passphrase=b"pw"), KdfParams(memory_kib=8192))
    bid = BackupId.parse("job/run/vm/vda")
    source = RawSource(str(image))
    backup_disk(vault, source, bid)
    source.close()
    chunks_before = vault.load_index().locations

    for info in list(backend.list("index/")):
        backend.delete(info.key)
    assert not vault.load_index().locations

    report = rebuild_index(vault)
    assert report.packs_read > 1 and not report.unreadable_packs
    assert vault.load_index().locations == chunks_before
    restore_backup(vault, bid, str(tmp_path / "out.img"))
    assert (tmp_path / "out.img").read_bytes() == image.read_bytes()


def test_rebuild_skips_and_reports_an_unreadable_pack(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    backend = LocalBackend(tmp_path / "vault", create=True)
    vault = Vault.init(backend, VaultConfig.new(chunk_size=64 << 10, pack_size=256 << 10))
    source = RawSource(str(image))
    backup_disk(vault, source, BackupId.parse("job/run/vm/vda"))
    source.close()
    victim = next(iter(backend.list("data/")))
    path = tmp_path / "vault" / victim.key
    path.write_bytes(path.read_bytes()[:-10])  # truncated: its trailer is gone

    report = rebuild_index(vault)
    assert [bad["object"] for bad in report.unreadable_packs] == [victim.key]
    assert report.packs_read == len(list(backend.list("data/"))) - 1


def test_a_rebuilt_index_comes_in_objects_of_bounded_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader holds a whole index object while decoding it: the rebuild writes pieces, the last one
    superseding the objects it replaces (format.md §7)."""
    monkeypatch.setattr(rebuild_module, "MERGE_ENTRIES", 10)
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(3 << 20))
    backend = LocalBackend(tmp_path / "vault", create=True)
    vault = Vault.init(backend, VaultConfig.new(chunk_size=64 << 10, pack_size=256 << 10), None)
    source = RawSource(str(image))
    backup_disk(vault, source, BackupId.parse("job/run/vm/vda"))
    source.close()
    before = vault.load_index()

    rebuild_index(vault)

    objects = index_objects(vault)
    assert len(objects) == 5 and all(len(f) <= 10 for f in objects.values())  # 48 chunks
    assert [{s.hex() for s in f.supersedes} for f in objects.values() if f.supersedes] == [before.index_ids]
    assert vault.load_index().locations == before.locations
