"""A backed-up VM comes back as a new domain that boots, answers its agent and holds the backed-up data."""

from __future__ import annotations

import hashlib
import os
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


def test_restore_in_place_of_one_disk_rolls_it_back_keeps_the_other_and_the_next_backup_reads_in_full(
        conn: libvirt.virConnect, tmp_path: Path) -> None:
    from raksha.hypervisor.restore import restore_in_place

    vault = Vault.init(LocalBackend(tmp_path / "vault", create=True), VaultConfig.new(chunk_size=64 << 10))
    good, bad = os.urandom(48 << 10), os.urandom(48 << 10)
    template = GuestDomain(conn, build_guest(), [(make_data_disk(tmp_path / "a.qcow2", "64M"), "qcow2"),
                                                 (make_data_disk(tmp_path / "b.qcow2", "64M"), "qcow2")],
                           tmp_path, name="raksha-ip")
    dom = conn.defineXML(template.xml)  # persistent: in place means the same VM, shut off and started again
    dom.create()
    with GuestDomain.attached(conn, dom, tmp_path) as vm:
        vm.wait_for_agent()
        for dev in ("vda", "vdb"):
            assert vm.exec(f"cat > /mnt/{dev}/data.bin && sync", stdin=good)[0] == 0
        backup_domains(conn, [vm.name], vault, "job", "good")
        for dev in ("vda", "vdb"):  # the mistake to undo, on vdb only; vda's change is kept
            assert vm.exec(f"cat > /mnt/{dev}/data.bin && sync", stdin=bad)[0] == 0

        events: list[ProgressEvent] = []
        restored = restore_in_place(conn, vault, "job", "good", dom.UUIDString(), only_disks={"vdb"},
                                    progress=events.append)

        assert restored.started and restored.uuid == dom.UUIDString()
        assert restored.disks == {"vdb": str(tmp_path / "b.qcow2")} and restored.chunks_verified > 0
        assert events and events[-1].done == events[-1].total > 0
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
