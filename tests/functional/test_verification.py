"""The service verifies its vaults on a timer, one group of packs' data at a time (the groups follow the
clock): on a real server (waitress, SQLite, its encrypted local vault), a backup in the vault is found
sound, then a flipped byte in its pack is found and the backup named."""

from __future__ import annotations

import os
import subprocess
import sys
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

PROJECT = "verified"


def _record_run(srv: Server, vault_id: str) -> tuple[str, str]:
    """A job's finished run in the server's database with one disk stored in the vault service, as the
    orchestration leaves it; its run id and the disk's backup id in the vault."""
    with srv.embedded.db.begin() as s:
        job = db.create_job(s, PROJECT, "user", name="app", vms=["vm-a"])
        run = db.create_run(s, PROJECT, "user", job.id, backuptype="full")
    with srv.embedded.db.begin() as s:
        db.transition_run(s, PROJECT, run.id, "snapshotting", expected="queued")
        (vm,) = run.vms
        db.transition_run_vm(s, PROJECT, vm.id, "snapshotting")
        db.transition_run(s, PROJECT, run.id, "uploading", consistency="filesystem")
        db.transition_run_vm(s, PROJECT, vm.id, "uploading")
        disk = db.add_run_vm_resource(s, PROJECT, vm.id, resource_name="vda", backuptype="full")
        bid = f"{job.id}/{run.id}/vm-a/vda"
        backup = db.add_vm_resource_backup(s, PROJECT, disk.id, vault_service_id=vault_id, vault_backup_id=bid)
        db.transition_vm_resource_backup(s, PROJECT, backup.id, "available")
        for stage in ("snapshotting", "uploading", "available"):
            db.transition_run_vm_resource(s, PROJECT, disk.id, stage)
        db.transition_run_vm(s, PROJECT, vm.id, "available")
        db.settle_run(s, PROJECT, run.id, progress_percent=100)
    return run.id, bid


def _fill_vault(srv: Server, image: Path) -> tuple[str, str, str, Path]:
    """Back up ``image`` into the server's vault as a run's disk; the run, its backup id and the pack."""
    with srv.embedded.db.begin() as s:
        (row,) = db.all_vault_services(s)
    run_id, bid = _record_run(srv, row.id)
    vault = vaults.open_vault(row)  # made on first use, as a run would
    try:
        source = RawSource(str(image))
        try:
            backup_disk(vault, source, BackupId.parse(bid), threads=1)
        finally:
            source.close()
        (pack_id, _size, _mtime), = vault.iter_packs()
        return row.id, run_id, bid, vaults.local_path(row) / pack_key(pack_id)
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


def _cli(srv: Server, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "raksha.cli.main", *args], text=True,
                          env={**os.environ, "RAKSHA_URL": srv.url, "RAKSHA_PROJECT": PROJECT},
                          capture_output=True, timeout=120, stdin=subprocess.DEVNULL, check=True).stdout


def test_the_server_verifies_its_vault_on_a_timer_and_names_damage(tmp_path: Path) -> None:
    """The run's verify state through the API: null, ``ok`` after a pass that began after it finished,
    ``damaged`` (with what) after a byte of its pack flipped."""
    image = chunk_image(tmp_path / "disk.img", [random_chunk(i) for i in range(8)])
    with Server(tmp_path / "srv", scheduler__verify_interval_seconds=0.3, scheduler__verify_groups=1) as srv:
        api = srv.client(PROJECT)
        vault_id, run_id, bid, pack = _fill_vault(srv, image)
        report = _next_report(srv, vault_id, None)
        report = _next_report(srv, vault_id, report)  # one that began after the backup was there
        assert report["ok"] and report["backups_checked"] == 1 and report["read_data_subset"] == "1/1"
        assert report["packs_checked"] == 1 and report["packs_not_read"] == 0
        run = api.get(f"/backupjobruns/{run_id}").body["backupjobrun"]
        assert run["verify_state"] == "ok" and run["verified_at"] and run["verify_note"] is None
        assert "verify: ok" in _cli(srv, "run", "show", run_id)

        middle = pack.stat().st_size // 2  # inside the one blob: the image is 512 KiB of random data
        with open(pack, "r+b") as f:
            f.seek(middle)
            byte = f.read(1)
            f.seek(middle)
            f.write(bytes([byte[0] ^ 0x01]))
        report = _next_report(srv, vault_id, report)
        report = _next_report(srv, vault_id, report)
        assert not report["ok"] and list(report["damaged_backups"]) == [bid]
        run = api.get(f"/backupjobruns/{run_id}").body["backupjobrun"]
        assert run["verify_state"] == "damaged", run
        assert run["verify_note"].startswith("vm-a/vda: ") and "chunk" in run["verify_note"], run["verify_note"]
        shown = _cli(srv, "run", "show", run_id)
        assert "verify: DAMAGED" in shown and f"  {run['verify_note']}" in shown, shown
        (line,) = [line for line in _cli(srv, "run", "list").splitlines() if line.startswith(run_id)]
        assert " DAMAGED " in line, line
        with srv.embedded.db.begin() as s:
            (row,) = db.all_vault_services(s)
            assert row.verifications[0]["ok"] is False and row.verifications[0]["data_subset"] == "1/1"
            assert row.verifications[0]["damaged_backups"] == {bid: run["verify_note"].removeprefix("vm-a/vda: ")}


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
