"""The service verifies its vaults on a timer, one group of packs' data at a time (the groups follow the
clock): on a real server (waitress, SQLite, its encrypted local vault), a backup in the vault is found
sound, then a flipped byte in its pack is found and the backup named."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from raksha_server import Server

from conftest import chunk_image, random_chunk
from raksha.db import api as db
from raksha.services import vaults
from raksha.services.verification import Verifier
from raksha.vault.engine.backup import backup_disk
from raksha.vault.format.naming import BackupId
from raksha.vault.format.pack import pack_key
from raksha.vault.sources.raw import RawSource

BID = "job/run/vm/vda"


def _fill_vault(srv: Server, image: Path) -> tuple[str, Path]:
    """Back up ``image`` into the server's vault; the vault service's id and the pack it went to."""
    with srv.embedded.db.begin() as s:
        (row,) = db.all_vault_services(s)
    vault = vaults.open_vault(row)  # made on first use, as a run would
    try:
        source = RawSource(str(image))
        try:
            backup_disk(vault, source, BackupId.parse(BID), threads=1)
        finally:
            source.close()
        (pack_id, _size, _mtime), = vault.iter_packs()
        return row.id, vaults.local_path(row) / pack_key(pack_id)
    finally:
        vault.close()


def _next_report(srv: Server, vault_id: str, after: dict[str, Any] | None, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        report = srv.embedded.verifier.last_verify.get(vault_id)
        if report is not None and report is not after:
            return report
        assert time.monotonic() < deadline, srv.embedded.verifier.last_verify
        time.sleep(0.05)


def test_the_server_verifies_its_vault_on_a_timer_and_names_damage(tmp_path: Path) -> None:
    image = chunk_image(tmp_path / "disk.img", [random_chunk(i) for i in range(8)])
    with Server(tmp_path / "srv", scheduler__verify_interval_seconds=0.3, scheduler__verify_groups=1) as srv:
        vault_id, pack = _fill_vault(srv, image)
        report = _next_report(srv, vault_id, None)
        report = _next_report(srv, vault_id, report)  # one that began after the backup was there
        assert report["ok"] and report["backups_checked"] == 1 and report["read_data_subset"] == "1/1"
        assert report["packs_checked"] == 1 and report["packs_not_read"] == 0

        middle = pack.stat().st_size // 2  # inside the one blob: the image is 512 KiB of random data
        with open(pack, "r+b") as f:
            f.seek(middle)
            byte = f.read(1)
            f.seek(middle)
            f.write(bytes([byte[0] ^ 0x01]))
        report = _next_report(srv, vault_id, report)
        report = _next_report(srv, vault_id, report)
        assert not report["ok"] and list(report["damaged_backups"]) == [BID]


def test_each_interval_reads_the_next_group_and_a_restart_goes_on_from_the_clock(tmp_path: Path) -> None:
    now = [7 * 86400.0 * 100]  # the start of a group cycle
    verifier = Verifier(None, interval=86400.0, groups=7, clock=lambda: now[0])  # type: ignore[arg-type]
    seen = []
    for _day in range(8):
        seen.append(verifier.subset().spec)
        now[0] += 86400.0
    assert seen == ["1/7", "2/7", "3/7", "4/7", "5/7", "6/7", "7/7", "1/7"]
    again = Verifier(None, interval=86400.0, groups=7, clock=lambda: now[0] + 3600)  # type: ignore[arg-type]
    assert again.subset().spec == "2/7"  # a server started later that day takes that day's group
    assert Verifier(None, interval=0, groups=1).subset().spec == "1/1"  # type: ignore[arg-type]


def test_a_vault_never_used_is_not_made_by_the_verifier(tmp_path: Path) -> None:
    with Server(tmp_path / "srv", scheduler__verify_interval_seconds=0) as srv:
        assert srv.embedded.verifier.verify_all() == {}
        with srv.embedded.db.begin() as s:
            (row,) = db.all_vault_services(s)
        assert not os.path.exists(vaults.local_path(row) / "config")


def test_runs_fall_on_the_clocks_multiples_of_the_interval_not_an_interval_after_the_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server restarted every 12 hours still verifies daily: its first run waits for 00:00 UTC."""
    now = [86400.0 * 1000 + 3600 * 20]  # 20:00 UTC
    verifier = Verifier(None, interval=86400.0, groups=7, clock=lambda: now[0])  # type: ignore[arg-type]
    waits: list[float] = []
    runs: list[str] = []

    def wait(timeout: float | None = None) -> bool:
        waits.append(timeout or 0.0)
        now[0] += timeout or 0.0
        return len(waits) > 2  # stop after two runs

    monkeypatch.setattr(verifier._stop, "wait", wait)
    monkeypatch.setattr(verifier, "verify_all", lambda: runs.append(verifier.subset().spec) or {})
    verifier._loop()
    assert waits[:2] == [4 * 3600.0, 86400.0]  # to midnight, then a day
    assert runs == ["1/7", "2/7"]  # days 1001 and 1002 since the epoch: 1001 % 7 = 0
