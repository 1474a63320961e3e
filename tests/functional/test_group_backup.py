"""``backup_domains``: live, consistent full and incremental runs of several domains into the vault."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from libvirt_guests import GuestDomain, build_guest, debugfs_cat, make_data_disk  # noqa: E402

from raksha.hypervisor.group_backup import backup_domains, checkpoint_name  # noqa: E402
from raksha.hypervisor.pull import CRASH, FILESYSTEM  # noqa: E402
from raksha.vault.backends.local import LocalBackend  # noqa: E402
from raksha.vault.engine.restore import restore_backup  # noqa: E402
from raksha.vault.format.config import VaultConfig  # noqa: E402
from raksha.vault.format.naming import BackupId  # noqa: E402
from raksha.vault.repository import Vault  # noqa: E402


def test_full_incremental_and_a_lost_checkpoint_downgrading_to_full(conn: libvirt.virConnect,
                                                                    tmp_path: Path) -> None:
    guest = build_guest()
    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    data = {run: os.urandom(32 << 10) for run in ("mon", "tue", "wed")}
    with GuestDomain(conn, guest, [(make_data_disk(tmp_path / "a.qcow2", "64M"), "qcow2")], tmp_path,
                     name="raksha-gb-a") as a, \
            GuestDomain(conn, guest, [(make_data_disk(tmp_path / "b.qcow2", "64M"), "qcow2")], tmp_path,
                        name="raksha-gb-b", agent=False) as b:
        a.wait_for_agent()
        assert a.dom is not None and b.dom is not None
        names = ["raksha-gb-a", "raksha-gb-b"]
        runs = {}
        parent = None
        for run in ("mon", "tue", "wed"):
            assert a.exec(f"cat > /mnt/vda/{run}.bin && sync", stdin=data[run])[0] == 0
            if run == "wed":  # a's checkpoint is lost (as after undefine/redefine): wed must read a in full
                a.dom.checkpointLookupByName(checkpoint_name("job", "tue")).delete(0)
            runs[run] = backup_domains(conn, names, vault, "job", run, parent_run=parent)
            parent = run
        # Only the newest checkpoint is kept on each domain.
        assert [c.getName() for c in a.dom.listAllCheckpoints()] == [checkpoint_name("job", "wed")]
        uuid_a = a.dom.UUIDString()

    levels = {vm.name: vm.consistency for vm in runs["mon"].vms}
    assert levels == {"raksha-gb-a": FILESYSTEM, "raksha-gb-b": CRASH}
    kinds = {run: {vm.name: vm.disks[0].kind for vm in r.vms} for run, r in runs.items()}
    assert kinds == {"mon": {"raksha-gb-a": "full", "raksha-gb-b": "full"},
                     "tue": {"raksha-gb-a": "incremental", "raksha-gb-b": "incremental"},
                     "wed": {"raksha-gb-a": "full", "raksha-gb-b": "incremental"}}
    wed_a = next(vm for vm in runs["wed"].vms if vm.name == "raksha-gb-a").disks[0]
    assert "missing" in wed_a.tracking
    tue_a = next(vm for vm in runs["tue"].vms if vm.name == "raksha-gb-a").disks[0]
    assert tue_a.bytes_read < wed_a.bytes_read  # the bitmap read less than the full re-read
    for i, run in enumerate(("mon", "tue", "wed")):
        out = tmp_path / f"{run}.raw"
        restore_backup(vault, BackupId.parse(f"job/{run}/{uuid_a}/vda"), str(out))
        for j, day in enumerate(("mon", "tue", "wed")):
            assert debugfs_cat(out, f"/{day}.bin") == (data[day] if j <= i else b"")
    meta = vault.read_metadata(BackupId.parse(f"job/wed/{uuid_a}/vda"))
    assert meta["hints"]["vm_name"] == "raksha-gb-a" and meta["hints"]["consistency"] == FILESYSTEM
    # Saved beside the disk: enough to recreate the VM.
    assert "<name>raksha-gb-a</name>" in meta["hints"]["domain_xml"]
    assert json.loads(meta["hints"]["backing_chain"]) == [{"filename": str(tmp_path / "a.qcow2"), "format": "qcow2"}]
    assert json.loads(meta["hints"]["interfaces"]) == []


def test_the_pull_job_ends_while_the_vault_commits_the_last_disk(conn: libvirt.virConnect, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a domain's last disk is read, its backup job (and the guest's copy-before-write) ends at once,
    not after the vault has committed; the disks before it still read from the running job."""
    from raksha.vault.engine import backup as engine

    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    disks = [(make_data_disk(tmp_path / "a.qcow2", "32M"), "qcow2"), (make_data_disk(tmp_path / "b.raw", "32M",
                                                                                    fmt="raw"), "raw")]
    seen: list[tuple[str, bool]] = []
    commit = engine._Backup._commit

    def observed_commit(self: engine._Backup) -> object:
        # The job ending began before this commit if it ends while we wait here (it takes milliseconds).
        dom = conn.lookupByName("raksha-gb-end")
        ended = False
        for _ in range(250):
            if dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE:
                ended = True
                break
            time.sleep(0.02)
        seen.append((self.id.resource, ended))
        return commit(self)

    monkeypatch.setattr(engine._Backup, "_commit", observed_commit)
    with GuestDomain(conn, build_guest(), disks, tmp_path, name="raksha-gb-end", agent=False) as vm:
        assert vm.dom is not None
        for run, parent in (("full", None), ("incr", "full")):
            seen.clear()
            result = backup_domains(conn, ["raksha-gb-end"], vault, "job", run, parent_run=parent)
            assert [d.kind for d in result.vms[0].disks] == (["full", "full"] if parent is None
                                                            else ["incremental", "incremental"])
            assert seen == [("vda", False), ("vdb", True)], run
            assert vm.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
