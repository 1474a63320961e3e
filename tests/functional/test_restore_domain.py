"""A backed-up VM comes back as a new domain that boots, answers its agent and holds the backed-up data."""

from __future__ import annotations

import hashlib
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from libvirt_guests import GuestDomain, build_guest, make_data_disk  # noqa: E402

from raksha.domain.errors import InvalidInput  # noqa: E402
from raksha.hypervisor.group_backup import backup_domains  # noqa: E402
from raksha.hypervisor.restore import restore_domain  # noqa: E402
from raksha.vault.backends.local import LocalBackend  # noqa: E402
from raksha.vault.engine.progress import ProgressEvent  # noqa: E402
from raksha.vault.format.config import VaultConfig  # noqa: E402
from raksha.vault.repository import Vault  # noqa: E402


def test_restore_to_a_new_domain_boots_with_the_data_of_that_point(conn: libvirt.virConnect,
                                                                   tmp_path: Path) -> None:
    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    before, after = os.urandom(48 << 10), os.urandom(48 << 10)
    with GuestDomain(conn, build_guest(), [(make_data_disk(tmp_path / "a.qcow2", "64M"), "qcow2")], tmp_path,
                     name="raksha-rs-src") as vm:
        vm.wait_for_agent()
        assert vm.exec("cat > /mnt/vda/data.bin && sync", stdin=before)[0] == 0
        run = backup_domains(conn, [vm.name], vault, "job", "run1")
        assert vm.exec("cat > /mnt/vda/data.bin && sync", stdin=after)[0] == 0  # the source moves on
        source_uuid = run.vms[0].uuid

        private = tmp_path / "private"  # QEMU (libvirt-qemu) may not pass: refused before a byte is written
        private.mkdir(mode=0o700)
        with pytest.raises(InvalidInput) as refused:
            restore_domain(conn, vault, "job", "run1", source_uuid, name="raksha-rs-new", target_dir=private)
        assert refused.value.code == "TARGET_DIR_UNREACHABLE" and refused.value.details["blocked"] == str(private)
        assert list(private.iterdir()) == [] and "raksha-rs-new" not in [d.name() for d in conn.listAllDomains()]

        restored = restore_domain(conn, vault, "job", "run1", source_uuid, name="raksha-rs-new",
                                  target_dir=tmp_path)
        with GuestDomain.attached(conn, conn.lookupByName("raksha-rs-new"), tmp_path) as copy:
            assert restored.started and restored.uuid != source_uuid
            assert restored.disks == {"vda": str(tmp_path / "raksha-rs-new-vda.qcow2")}
            copy.wait_for_agent()
            code, out = copy.exec("sha256sum /mnt/vda/data.bin")
            assert code == 0 and out.split()[0].decode() == hashlib.sha256(before).hexdigest()
            assert copy.dom is not None
            sources = [s.get("file") for s in ET.fromstring(copy.dom.XMLDesc(0)).iter("source")]
            assert str(tmp_path / "a.qcow2") not in sources  # never the original's disk
        code, out = vm.exec("sha256sum /mnt/vda/data.bin")  # the original is untouched
        assert out.split()[0].decode() == hashlib.sha256(after).hexdigest()


def _persistent_guest(conn: libvirt.virConnect, tmp_path: Path, name: str) -> libvirt.virDomain:
    """A running persistent domain with two qcow2 data disks: in place means the same VM, shut off and
    started again."""
    template = GuestDomain(conn, build_guest(), [(make_data_disk(tmp_path / "a.qcow2", "64M"), "qcow2"),
                                                 (make_data_disk(tmp_path / "b.qcow2", "64M"), "qcow2")],
                           tmp_path, name=name)
    dom = conn.defineXML(template.xml)
    dom.create()
    return dom


def _file_in_image(image: Path, name: str) -> bytes:
    """A file of the ext4 filesystem that fills a raw image, read offline (debugfs)."""
    res = subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)], capture_output=True, check=True)
    return res.stdout


def test_restore_in_place_writes_only_what_differs_and_the_checkpoints_stay_true(conn: libvirt.virConnect,
                                                                                 tmp_path: Path) -> None:
    from raksha.hypervisor.restore import IN_PLACE, RestoreRequest, restore
    from raksha.vault.engine.restore import restore_backup
    from raksha.vault.format.naming import BackupId

    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    good, mid, bad, later = (os.urandom(48 << 10) for _ in range(4))
    dom = _persistent_guest(conn, tmp_path, "raksha-ip-changed")
    with GuestDomain.attached(conn, dom, tmp_path) as vm:
        vm.wait_for_agent()
        for dev in ("vda", "vdb"):
            assert vm.exec(f"cat > /mnt/{dev}/data.bin && sync", stdin=good)[0] == 0
        backup_domains(conn, [vm.name], vault, "job", "r1")
        assert vm.exec("cat > /mnt/vdb/data.bin && sync", stdin=mid)[0] == 0
        backup_domains(conn, [vm.name], vault, "job", "r2", parent_run="r1")  # the checkpoint is r2's now
        for dev in ("vda", "vdb"):  # the mistake to undo, on vdb only; vda's change is kept
            assert vm.exec(f"cat > /mnt/{dev}/data.bin && sync", stdin=bad)[0] == 0

        events: list[ProgressEvent] = []
        report = restore(conn, vault, RestoreRequest("job", "r1", IN_PLACE, vms=[dom.UUIDString()], disks=["vdb"],
                                                     start=False), progress=events.append)
        (disk,) = report.vms[0].disks
        assert disk.method == "changed" and "raksha-job-r2" in disk.how and disk.verified, disk
        point = vault.read_manifest(BackupId.parse(disk.backup_id))
        assert 0 < disk.bytes_written < point.data_bytes() // 2  # what differs (~2 x 48 KiB and metadata)
        assert events and events[-1].done == events[-1].total == disk.bytes_written  # progress of what is written
        whole = tmp_path / "r1-vdb.raw"
        restore_backup(vault, BackupId.parse(disk.backup_id), str(whole))
        compared = subprocess.run(["qemu-img", "compare", str(tmp_path / "b.qcow2"), str(whole)],
                                  capture_output=True, text=True)
        assert compared.returncode == 0, compared.stdout + compared.stderr  # bit-identical to r1

        dom.create()
        vm.wait_for_agent()
        for dev, expected in (("vda", bad), ("vdb", good)):
            code, out = vm.exec(f"sha256sum /mnt/{dev}/data.bin")
            assert code == 0 and out.split()[0].decode() == hashlib.sha256(expected).hexdigest(), dev
        assert vm.exec("cat > /mnt/vdb/later.bin && sync", stdin=later)[0] == 0
        after = backup_domains(conn, [vm.name], vault, "job", "r3", parent_run="r2")
        assert {d.target: d.kind for d in after.vms[0].disks} == {"vda": "incremental", "vdb": "incremental"}
        # Incremental to r2, yet r3 holds r1's data.bin: the bitmap recorded what the restore wrote.
        r3 = tmp_path / "r3-vdb.raw"
        restore_backup(vault, BackupId.parse(disk.backup_id.replace("/r1/", "/r3/")), str(r3))
        assert _file_in_image(r3, "data.bin") == good and _file_in_image(r3, "later.bin") == later


def test_restore_in_place_of_a_raw_disk_uses_the_qemu_bitmap_read_before_the_shut_off(conn: libvirt.virConnect,
                                                                                      tmp_path: Path) -> None:
    from raksha.hypervisor.restore import IN_PLACE, RestoreRequest, restore
    from raksha.vault.engine.restore import restore_backup
    from raksha.vault.format.naming import BackupId

    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    good, bad = os.urandom(48 << 10), os.urandom(48 << 10)
    template = GuestDomain(conn, build_guest(), [(make_data_disk(tmp_path / "a.qcow2", "64M"), "qcow2"),
                                                 (make_data_disk(tmp_path / "b.raw", "64M", fmt="raw"), "raw")],
                           tmp_path, name="raksha-ip-mixed")
    dom = conn.defineXML(template.xml)
    dom.create()
    with GuestDomain.attached(conn, dom, tmp_path) as vm:
        vm.wait_for_agent()
        for dev in ("vda", "vdb"):
            assert vm.exec(f"cat > /mnt/{dev}/data.bin && sync", stdin=good)[0] == 0
        backup_domains(conn, [vm.name], vault, "job", "r1")
        for dev in ("vda", "vdb"):
            assert vm.exec(f"cat > /mnt/{dev}/data.bin && sync", stdin=bad)[0] == 0

        # Running: the raw disk's QEMU bitmap is read (the domain paused) before the shut-off.
        report = restore(conn, vault, RestoreRequest("job", "r1", IN_PLACE, vms=[dom.UUIDString()], start=False))
        disks = {d.target: d for d in report.vms[0].disks}
        assert {t: (d.method, d.verified) for t, d in disks.items()} == {"vda": ("changed", True),
                                                                         "vdb": ("changed", True)}, report.to_dict()
        assert "(QEMU)" in disks["vdb"].how and disks["vdb"].bytes_written < (1 << 20), disks["vdb"]
        whole = tmp_path / "r1-vdb.raw"
        restore_backup(vault, BackupId.parse(disks["vdb"].backup_id), str(whole))
        assert (tmp_path / "b.raw").read_bytes() == whole.read_bytes()  # bit-identical to r1

        # Shut off: the raw disk's bitmap went with QEMU; the qcow2 disk's is saved in its image.
        report = restore(conn, vault, RestoreRequest("job", "r1", IN_PLACE, vms=[dom.UUIDString()]))
        disks = {d.target: d for d in report.vms[0].disks}
        assert (disks["vda"].method, disks["vdb"].method) == ("changed", "whole")
        assert "not running" in disks["vdb"].how
        vm.wait_for_agent()
        for dev in ("vda", "vdb"):
            code, out = vm.exec(f"sha256sum /mnt/{dev}/data.bin")
            assert code == 0 and out.split()[0].decode() == hashlib.sha256(good).hexdigest(), dev
        after = backup_domains(conn, [vm.name], vault, "job", "r2", parent_run="r1")
        assert {d.target: d.kind for d in after.vms[0].disks} == {"vda": "incremental", "vdb": "full"}


def test_a_restore_read_back_catches_a_wrong_rollback_and_the_next_one_finishes_it(
        conn: libvirt.virConnect, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from raksha.domain.errors import VaultCorrupt
    from raksha.hypervisor import rollback
    from raksha.hypervisor.restore import IN_PLACE, RestoreRequest, restore

    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    good, bad = os.urandom(48 << 10), os.urandom(48 << 10)
    dom = _persistent_guest(conn, tmp_path, "raksha-ip-readback")
    with GuestDomain.attached(conn, dom, tmp_path) as vm:
        vm.wait_for_agent()
        assert vm.exec("cat > /mnt/vdb/data.bin && sync", stdin=good)[0] == 0
        backup_domains(conn, [vm.name], vault, "job", "r1")
        assert vm.exec("cat > /mnt/vdb/data.bin && sync", stdin=bad)[0] == 0
        request = RestoreRequest("job", "r1", IN_PLACE, vms=[dom.UUIDString()], disks=["vdb"], read_back=True)

        # A planner that forgets the bitmap writes too little: reading the disk back says so.
        real = rollback.chunks_to_roll_back
        monkeypatch.setattr(rollback, "chunks_to_roll_back", lambda point, since, dirty: real(point, since, []))
        with pytest.raises(VaultCorrupt) as wrong:
            restore(conn, vault, request)
        assert wrong.value.code == "RESTORE_MISMATCH" and not dom.isActive(), wrong.value
        monkeypatch.undo()

        report = restore(conn, vault, request)  # the bitmap still marks what the guest wrote: right this time
        (disk,) = report.vms[0].disks
        assert (disk.method, disk.read_back) == ("changed", True), disk
        vm.wait_for_agent()
        code, out = vm.exec("sha256sum /mnt/vdb/data.bin")
        assert code == 0 and out.split()[0].decode() == hashlib.sha256(good).hexdigest()


def test_restore_in_place_after_qemu_was_killed_rewrites_the_disk_whole(conn: libvirt.virConnect,
                                                                        tmp_path: Path) -> None:
    """A QEMU killed with SIGKILL leaves its bitmaps marked in-use (inconsistent): they are not trusted."""
    import signal
    import time

    from raksha.hypervisor.restore import IN_PLACE, RestoreRequest, restore

    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    good, bad = os.urandom(48 << 10), os.urandom(48 << 10)
    dom = _persistent_guest(conn, tmp_path, "raksha-ip-killed")
    with GuestDomain.attached(conn, dom, tmp_path) as vm:
        vm.wait_for_agent()
        assert vm.exec("cat > /mnt/vdb/data.bin && sync", stdin=good)[0] == 0
        backup_domains(conn, [vm.name], vault, "job", "r1")
        assert vm.exec("cat > /mnt/vdb/data.bin && sync", stdin=bad)[0] == 0
        os.kill(int(Path(f"/run/libvirt/qemu/{vm.name}.pid").read_text()), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while dom.isActive() and time.monotonic() < deadline:
            time.sleep(0.1)

        report = restore(conn, vault, RestoreRequest("job", "r1", IN_PLACE, vms=[dom.UUIDString()], disks=["vdb"]))
        (disk,) = report.vms[0].disks
        assert disk.method == "whole" and disk.verified and "consistent bitmap" in disk.how, disk
        vm.wait_for_agent()
        code, out = vm.exec("sha256sum /mnt/vdb/data.bin")
        assert code == 0 and out.split()[0].decode() == hashlib.sha256(good).hexdigest()


def test_restore_in_place_rewriting_whole_disks_keeps_the_other_and_the_next_backup_reads_in_full(
        conn: libvirt.virConnect, tmp_path: Path) -> None:
    from raksha.hypervisor.restore import IN_PLACE, RestoreRequest, restore

    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    good, bad = os.urandom(48 << 10), os.urandom(48 << 10)
    dom = _persistent_guest(conn, tmp_path, "raksha-ip")
    with GuestDomain.attached(conn, dom, tmp_path) as vm:
        vm.wait_for_agent()
        for dev in ("vda", "vdb"):
            assert vm.exec(f"cat > /mnt/{dev}/data.bin && sync", stdin=good)[0] == 0
        backup_domains(conn, [vm.name], vault, "job", "good")
        for dev in ("vda", "vdb"):  # the mistake to undo, on vdb only; vda's change is kept
            assert vm.exec(f"cat > /mnt/{dev}/data.bin && sync", stdin=bad)[0] == 0

        events: list[ProgressEvent] = []
        report = restore(conn, vault, RestoreRequest("job", "good", IN_PLACE, vms=[dom.UUIDString()],
                                                     disks=["vdb"], changed_only=False), progress=events.append)

        restored = report.vms[0]
        assert restored.started and restored.uuid == dom.UUIDString()
        assert [(d.target, d.path, d.method) for d in restored.disks] == [("vdb", str(tmp_path / "b.qcow2"), "whole")]
        assert report.chunks_verified > 0 and events and events[-1].done == events[-1].total > 0
        vm.wait_for_agent()
        for dev, expected in (("vda", bad), ("vdb", good)):
            code, out = vm.exec(f"sha256sum /mnt/{dev}/data.bin")
            assert code == 0 and out.split()[0].decode() == hashlib.sha256(expected).hexdigest(), dev
        after = backup_domains(conn, [vm.name], vault, "job", "after", parent_run="good")
        assert {d.target: d.kind for d in after.vms[0].disks} == {"vda": "full", "vdb": "full"}
        assert all("missing" in d.tracking for d in after.vms[0].disks)


def test_an_in_place_restore_refuses_a_domain_that_is_not_there_any_more(conn: libvirt.virConnect,
                                                                         tmp_path: Path) -> None:
    from raksha.domain.errors import NotFound
    from raksha.hypervisor.restore import IN_PLACE, RestoreRequest, restore

    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    with GuestDomain(conn, build_guest(), [(make_data_disk(tmp_path / "a.qcow2", "64M"), "qcow2")], tmp_path,
                     name="raksha-ip-gone", agent=False) as vm:
        run = backup_domains(conn, [vm.name], vault, "job", "r1")
    with pytest.raises(NotFound) as err:  # the transient domain is gone with its context
        restore(conn, vault, RestoreRequest("job", "r1", IN_PLACE, vms=["raksha-ip-gone"]))
    assert err.value.code == "VM_NOT_FOUND" and run.vms[0].uuid in err.value.message


def test_restore_in_place_under_the_snapshot_strategy_restores_the_base_and_drops_the_overlay(
        conn: libvirt.virConnect, tmp_path: Path) -> None:
    """The snapshot strategy leaves each disk running on an overlay over its base. In place, the base is
    what is restored: the domain runs on it alone again and the overlay is gone (not a standalone image
    named like an overlay, with the base left unused)."""
    from raksha.hypervisor.restore import restore_in_place
    from raksha.hypervisor.snapshot import disk_chains

    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    good, bad = os.urandom(48 << 10), os.urandom(48 << 10)
    base = make_data_disk(tmp_path / "a.qcow2", "64M")
    template = GuestDomain(conn, build_guest(), [(base, "qcow2")], tmp_path, name="raksha-ip-snap")
    dom = conn.defineXML(template.xml)
    dom.create()
    with GuestDomain.attached(conn, dom, tmp_path) as vm:
        vm.wait_for_agent()
        assert vm.exec("cat > /mnt/vda/data.bin && sync", stdin=good)[0] == 0
        backup_domains(conn, [vm.name], vault, "job", "r1", strategy="snapshot")
        (chain,) = disk_chains(dom.XMLDesc(0)).values()
        overlay = chain[0].path
        assert [layer.path for layer in chain] == [overlay, str(base)] and overlay.endswith(".raksha-job-r1.qcow2")
        assert vm.exec("cat > /mnt/vda/data.bin && sync", stdin=bad)[0] == 0

        restored = restore_in_place(conn, vault, "job", "r1", dom.UUIDString())

        assert restored.disks == {"vda": str(base)}
        assert not Path(overlay).exists()
        for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):  # running, and as defined
            (chain,) = disk_chains(dom.XMLDesc(flags)).values()
            assert [layer.path for layer in chain][:1] == [str(base)] and len(chain) == 1
        vm.wait_for_agent()
        code, out = vm.exec("sha256sum /mnt/vda/data.bin")
        assert code == 0 and out.split()[0].decode() == hashlib.sha256(good).hexdigest()
        after = backup_domains(conn, [vm.name], vault, "job", "r2", parent_run="r1", strategy="snapshot")
        assert after.vms[0].error is None and after.vms[0].disks[0].kind == "full"  # r1's overlay is gone

        # A shut-off domain: its definition may name only the overlay; the base is found from the image.
        (chain,) = disk_chains(dom.XMLDesc(0)).values()
        overlay = chain[0].path
        assert overlay.endswith(".raksha-job-r2.qcow2")
        dom.destroy()
        restored = restore_in_place(conn, vault, "job", "r1", dom.UUIDString())
        assert restored.disks == {"vda": str(base)} and not Path(overlay).exists()
        vm.wait_for_agent()
        code, out = vm.exec("sha256sum /mnt/vda/data.bin")
        assert code == 0 and out.split()[0].decode() == hashlib.sha256(good).hexdigest()
