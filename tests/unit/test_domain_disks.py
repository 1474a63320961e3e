"""Disk discovery reads what libvirt says a domain has; only real disks are backed up."""

from __future__ import annotations

import subprocess
from pathlib import Path

from raksha.hypervisor.disks import DiskInfo, backing_chain, domain_disks, domain_interfaces

DOMAIN = """<domain type='qemu'><name>app1</name><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='/var/lib/libvirt/images/app1-vda.qcow2'/><target dev='vda' bus='virtio'/></disk>
  <disk type='block' device='disk'><driver name='qemu' type='raw'/>
    <source dev='/dev/disk/by-path/cinder-volume1'/><target dev='vdb' bus='virtio'/></disk>
  <disk type='file' device='cdrom'><source file='/iso/install.iso'/><target dev='sda' bus='sata'/></disk>
  <disk type='network' device='disk'><source protocol='rbd' name='pool/img'/><target dev='vdc' bus='virtio'/></disk>
  <disk type='file' device='disk'><source file='/var/lib/libvirt/images/app1-vdaa.img'/>
    <target dev='vdaa' bus='virtio'/></disk>
  <disk type='file' device='disk'><driver name='qemu' type='raw'/><target dev='vdd' bus='virtio'/></disk>
</devices></domain>"""


def test_file_and_block_disks_in_target_order_without_cdroms_network_or_empty_drives() -> None:
    assert domain_disks(DOMAIN) == [
        DiskInfo("vda", "/var/lib/libvirt/images/app1-vda.qcow2", "file", "qcow2", "virtio", "disk"),
        DiskInfo("vdb", "/dev/disk/by-path/cinder-volume1", "block", "raw", "virtio", "disk"),
        # no <driver type>: libvirt treats the image as raw; vdaa sorts after vdb like the kernel's names
        DiskInfo("vdaa", "/var/lib/libvirt/images/app1-vdaa.img", "file", "raw", "virtio", "disk"),
    ]


def test_network_mappings_are_read_with_their_macs() -> None:
    xml = """<domain><devices>
      <interface type='network'><mac address='52:54:00:12:34:56'/><source network='tenant-net'/>
        <model type='virtio'/></interface>
      <interface type='bridge'><mac address='52:54:00:ab:cd:ef'/><source bridge='br-ex'/></interface>
    </devices></domain>"""
    assert domain_interfaces(xml) == [
        {"type": "network", "mac": "52:54:00:12:34:56", "source": "tenant-net", "model": "virtio"},
        {"type": "bridge", "mac": "52:54:00:ab:cd:ef", "source": "br-ex", "model": ""},
    ]


def test_backing_chain_names_the_shared_base_image(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "vm1-vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)], check=True)
    assert backing_chain(str(top)) == [{"filename": str(top), "format": "qcow2"},
                                       {"filename": str(base), "format": "qcow2"}]
    assert backing_chain(str(tmp_path / "missing.qcow2")) == []
