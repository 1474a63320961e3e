"""A running guest's disk backed up live into the vault through libvirt's pull-mode backup.

The mechanism the libvirt driver (issue 4) is built on, exercised end to end on
a real libvirtd and a real TCG guest: freeze, ``backup-begin`` with a
checkpoint, thaw, read the NBD export with libnbd into the vault; then the
same with the checkpoint's dirty bitmap for an incremental that reads only
what the guest wrote. Each restored point holds exactly what the guest had.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from libvirt_guests import GuestDomain, build_guest, debugfs_cat, make_data_disk  # noqa: E402

from raksha.hypervisor.pull import qemu_owner  # noqa: E402
from raksha.vault.backends.local import LocalBackend  # noqa: E402
from raksha.vault.engine.backup import BackupResult, backup_disk  # noqa: E402
from raksha.vault.engine.restore import restore_backup  # noqa: E402
from raksha.vault.format.config import VaultConfig  # noqa: E402
from raksha.vault.format.naming import BackupId  # noqa: E402
from raksha.vault.repository import Vault  # noqa: E402
from raksha.vault.sources.nbd import NbdSource  # noqa: E402

CHUNK = 64 << 10



def pull_backup(vm: GuestDomain, vault: Vault, tmp: Path, backup_id: str, checkpoint: str,
                parent: tuple[str, str] | None = None) -> BackupResult:
    """Freeze, start a pull backup (creating ``checkpoint``), thaw, then read the export into the vault."""
    assert vm.dom is not None
    # QEMU creates the socket and the scratch image: a directory of its own user's (libvirt-qemu here).
    own = tmp / f"{checkpoint}.qemu"
    own.mkdir(mode=0o700)
    owner = qemu_owner(vm.dom.XMLDesc(0))
    assert owner is not None
    os.chown(own, *owner)
    sock = own / "nbd.sock"
    incremental = f"<incremental>{parent[1]}</incremental>" if parent else ""
    backup_xml = (f"<domainbackup mode='pull'>{incremental}<server transport='unix' socket='{sock}'/>"
                  f"<disks><disk name='vda' backup='yes' type='file'>"
                  f"<scratch file='{own / 'scratch.qcow2'}'/></disk></disks></domainbackup>")
    checkpoint_xml = (f"<domaincheckpoint><name>{checkpoint}</name>"
                      f"<disks><disk name='vda' checkpoint='bitmap'/></disks></domaincheckpoint>")
    assert vm.agent("guest-fsfreeze-freeze") >= 1
    try:
        vm.dom.backupBegin(backup_xml, checkpoint_xml, 0)
    finally:
        vm.agent("guest-fsfreeze-thaw")
    try:
        source = NbdSource(str(sock), path=f"{vm.name}:vda", fmt="qcow2", export_name="vda",
                           dirty_bitmap="qemu:dirty-bitmap:backup-vda" if parent else None)
        try:
            changed = source.dirty_extents() if parent else None
            return backup_disk(vault, source, BackupId.parse(backup_id),
                               parent=BackupId.parse(parent[0]) if parent else None, changed_extents=changed)
        finally:
            source.close()
    finally:
        vm.dom.abortJob()  # a pull backup lasts until it is ended



def test_live_full_and_dirty_bitmap_incremental_of_a_running_guest(conn: libvirt.virConnect,
                                                                   tmp_path: Path) -> None:
    guest = build_guest()
    disk = make_data_disk(tmp_path / "data.qcow2", "64M")
    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=CHUNK))
    monday, tuesday = os.urandom(60 << 10), os.urandom(60 << 10)

    with GuestDomain(conn, guest, [(disk, "qcow2")], tmp_path) as vm:
        vm.wait_for_agent()
        assert vm.exec("cat > /mnt/vda/monday.bin && sync", stdin=monday)[0] == 0
        full = pull_backup(vm, vault, tmp_path, "job/run1/vm1/vda", "c1")
        assert vm.exec("cat > /mnt/vda/tuesday.bin && sync", stdin=tuesday)[0] == 0
        incr = pull_backup(vm, vault, tmp_path, "job/run2/vm1/vda", "c2", parent=("job/run1/vm1/vda", "c1"))

    assert full.stats.bytes_read >= len(monday)
    # The incremental reads the chunks the guest wrote since c1 (the file plus ext4 metadata and
    # journal), not the 64 MiB disk nor even everything the full read.
    assert incr.stats.bytes_read <= 1 << 20
    assert incr.stats.chunks_read < full.stats.chunks_read
    assert incr.stats.chunks_from_parent > 0
    for bid, name in (("job/run1/vm1/vda", "run1.raw"), ("job/run2/vm1/vda", "run2.raw")):
        restore_backup(vault, BackupId.parse(bid), str(tmp_path / name))
    assert debugfs_cat(tmp_path / "run1.raw", "/monday.bin") == monday
    assert debugfs_cat(tmp_path / "run1.raw", "/tuesday.bin") == b""  # not there yet at that point
    assert debugfs_cat(tmp_path / "run2.raw", "/monday.bin") == monday
    assert debugfs_cat(tmp_path / "run2.raw", "/tuesday.bin") == tuesday
