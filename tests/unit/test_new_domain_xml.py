"""How a saved domain definition becomes a new VM's: nothing that belongs to the original is kept."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from raksha.hypervisor.restore import new_domain_xml

SAVED = """<domain type='kvm'><name>app1</name><uuid>9f1c0e2a-1111-2222-3333-444455556666</uuid>
<devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='/images/app1-vda.qcow2'/><backingStore type='file'><source file='/images/base.qcow2'/>
    </backingStore><target dev='vda' bus='virtio'/></disk>
  <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg/app1-data'/>
    <target dev='vdb' bus='virtio'/></disk>
  <disk type='file' device='cdrom'><source file='/iso/tools.iso'/><target dev='sda' bus='sata'/></disk>
  <interface type='network'><mac address='52:54:00:12:34:56'/><source network='tenant'/></interface>
  <serial type='file'><source path='/var/log/app1.console'/><target port='0'/></serial>
</devices></domain>"""


def test_renamed_fresh_uuid_restored_disks_only_new_macs_and_no_shared_console() -> None:
    root = ET.fromstring(new_domain_xml(SAVED, "app1-restored", {"vda": ("/restore/app1-vda.raw", "raw")},
                                        keep_macs=False))
    assert root.findtext("name") == "app1-restored" and root.find("uuid") is None
    disks = root.findall("./devices/disk[@device='disk']")
    assert len(disks) == 1  # vdb is not restored: the new VM must never open the original's volume
    (vda,) = disks
    assert [s.get("file") for s in vda.findall("source")] == ["/restore/app1-vda.raw"]
    assert vda.find("backingStore") is None and vda.find("driver").get("type") == "raw"  # type: ignore[union-attr]
    assert root.find("./devices/disk[@device='cdrom']") is not None
    assert root.find("./devices/interface/mac") is None
    serial = root.find("./devices/serial")
    assert serial is not None and serial.get("type") == "pty" and serial.find("source") is None


def test_macs_can_be_kept() -> None:
    root = ET.fromstring(new_domain_xml(SAVED, "app1-dr", {}, keep_macs=True))
    assert root.find("./devices/interface/mac").get("address") == "52:54:00:12:34:56"  # type: ignore[union-attr]
