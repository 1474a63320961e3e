"""Hypervisor drivers: where VM disks are read from live and written back to (libvirt/QEMU first)."""
