"""A VM with a qcow2 boot-like disk, a raw data disk (the seed's vdb) and an excluded scratch disk.

libvirt refuses checkpoints on raw disks; the run must not fail for it: the raw
disk is tracked with a QEMU dirty bitmap (pull.py) and is incremental too, reading
about what the guest wrote; each disk records how it was tracked; the excluded disk
is skipped and recorded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from libvirt_guests import GuestDomain, build_guest, debugfs_cat, make_data_disk  # noqa: E402

from raksha.hypervisor.group_backup import backup_domains  # noqa: E402
from raksha.vault.backends.local import LocalBackend  # noqa: E402
from raksha.vault.engine.restore import restore_backup  # noqa: E402
from raksha.vault.format.config import VaultConfig  # noqa: E402
from raksha.vault.format.naming import BackupId  # noqa: E402
from raksha.vault.repository import Vault  # noqa: E402


def test_raw_and_qcow2_disks_are_incremental_excluded_is_skipped(conn: libvirt.virConnect,
                                                                         tmp_path: Path) -> None:
    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    disks = [(make_data_disk(tmp_path / "vda.qcow2", "64M"), "qcow2"),
             (make_data_disk(tmp_path / "vdb.raw", "64M", fmt="raw"), "raw"),
             (make_data_disk(tmp_path / "vdc.qcow2", "32M"), "qcow2")]
    data = {run: os.urandom(32 << 10) for run in ("mon", "tue")}
    with GuestDomain(conn, build_guest(), disks, tmp_path, name="raksha-mixed") as vm:
        vm.wait_for_agent()
        runs = {}
        parent = None
        for run in ("mon", "tue"):
            for dev in ("vda", "vdb"):
                assert vm.exec(f"cat > /mnt/{dev}/{run}.bin && sync", stdin=data[run])[0] == 0
            runs[run] = backup_domains(conn, [vm.name], vault, "job", run, parent_run=parent,
                                       exclude={vm.name: {"vdc"}})
            parent = run

    tue = runs["tue"].vms[0]
    assert tue.excluded == ["vdc"]
    by_disk = {d.target: d for d in tue.disks}
    assert set(by_disk) == {"vda", "vdb"}
    assert by_disk["vda"].kind == "incremental" and "dirty bitmap" in by_disk["vda"].tracking
    assert by_disk["vda"].method == "libvirt-checkpoint"
    assert by_disk["vdb"].kind == "incremental" and "QEMU dirty bitmap raksha-job-mon" in by_disk["vdb"].tracking
    assert by_disk["vdb"].method == "qemu-dirty-bitmap"
    mon_vdb = next(d for d in runs["mon"].vms[0].disks if d.target == "vdb")
    assert mon_vdb.kind == "full" and "starts tracking" in mon_vdb.tracking
    # 32 KiB written plus the ext4 metadata that changed with it, not the 64 MiB disk.
    assert 32 << 10 <= by_disk["vdb"].bytes_read <= 1 << 20
    for dev in ("vda", "vdb"):
        out = tmp_path / f"tue-{dev}.raw"
        restore_backup(vault, BackupId.parse(f"job/tue/{tue.uuid}/{dev}"), str(out))
        assert debugfs_cat(out, "/mon.bin") == data["mon"] and debugfs_cat(out, "/tue.bin") == data["tue"]
    assert not vault.backup_ids(f"job/tue/{tue.uuid}/vdc")
