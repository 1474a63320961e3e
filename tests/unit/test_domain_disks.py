"""Disk discovery reads what libvirt says a domain has; only real disks are backed up."""

from __future__ import annotations

from raksha.hypervisor.disks import DiskInfo, domain_disks

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
